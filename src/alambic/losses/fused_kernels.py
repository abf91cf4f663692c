"""Per-block math of the fused LM-head loss: values and closed-form logit gradients.

`block_loss_and_grad` takes the student and teacher logits of a few rows and
returns the summed KD and CE values plus d(loss)/d(student logits), written by
hand for every objective so no autograd graph is built per chunk. Values are
sums of p * log(p / m) terms with every log-ratio formed without cancelling
large numbers (see `Softmax`, `_log1p_weighted`); tests/unit/test_fused_loss.py
and test_loss_edges.py check values and gradients against the plain path.
Eager CPU speed is a count of passes over [rows, vocab] tensors: the softmax is
kept unnormalised, per-row factors are folded into the few ops that touch every
element, and the CE gradient (softmax - onehot) is merged into the divergence's.

Derivation shared by the softmax objectives (q = softmax(s), s = student / T):
for a divergence D whose partial derivative in q is g, the chain rule through
the softmax gives dD/ds = q * (g - <q, g>), and dD/dz = T * dD/ds for the raw
logits z once the T**2 factor is included. The g of each objective:
- forward_kl  KL(p||q):            dD/ds = q - p (directly)
- reverse_kl  KL(q||p):            g = log q - log p
- jsd         b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q:
                                   g = (1 - b) (log q - log m)   (the 1/m terms cancel)
- skew_forward_kl KL(p||m), m = a p + (1-a) q:   g = -(1 - a) p / m
- skew_reverse_kl KL(q||m), m = (1-a) p + a q:   g = log q - log m - a q / m
- tvd         0.5 sum |p - q|:     g = 0.5 sign(q - p)   (sign(0) = 0, as autograd's abs)
Constants added to g cancel because sum(q) = 1, which is why the +1 of
d(q log q)/dq never appears. cosine works on raw logits without T:
d(1 - cos)/ds = cos * s / |s|^2 - t / (|s| |t|).

    .venv/bin/pytest tests/unit/test_fused_loss.py -q
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from alambic.losses.divergences import excluded_columns

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossSpec:
    """What one call computes; frozen so torch.compile can specialise on it."""

    objective: str
    temperature: float
    beta: float
    skew_alpha: float
    top_k: int | None
    kd_weight: float  # weight of the divergence in the loss; 0 when it is not computed
    ce_weight: float  # weight of the cross-entropy; 0 when it is not computed
    labels_may_be_ignored: bool  # some counted row carries IGNORE_INDEX (explicit mask)
    teacher_may_be_infinite: bool = False  # dense teacher logits may hold -inf (excluded columns)

    @property
    def use_kd(self) -> bool:
        return self.kd_weight != 0.0

    @property
    def use_ce(self) -> bool:
        return self.ce_weight != 0.0


class Softmax(NamedTuple):
    """Softmax of scaled logits x, unnormalised: probs = exp * inv_total.

    Log-probabilities are kept as (x - row max) - log(total), never as x - logsumexp(x):
    with logits of +-30000 the latter loses 3 decimal digits to the size of x.
    """

    shifted: torch.Tensor  # x - row max (exact for the large entries that carry the mass)
    exp: torch.Tensor  # exp(x - row max)
    total: torch.Tensor  # sum(exp), [rows, 1]
    inv_total: torch.Tensor  # 1 / total, [rows, 1]
    log_total: torch.Tensor  # log(total), [rows, 1]


def _softmax(logits: torch.Tensor) -> Softmax:
    shifted = torch.sub(logits, logits.amax(-1, keepdim=True))
    exp = torch.exp(shifted)
    total = exp.sum(-1, keepdim=True)
    return Softmax(shifted, exp, total, total.reciprocal(), total.log())


def _log_ratio(numerator: Softmax, denominator: Softmax) -> torch.Tensor:
    """log p_numerator - log p_denominator, as (shifted difference) - log(total ratio)."""
    shift = torch.log(numerator.total * denominator.inv_total)
    return torch.sub(numerator.shifted, denominator.shifted).sub_(shift)


def _expectation(dist: Softmax, values: torch.Tensor) -> torch.Tensor:
    """sum_v p_v * values_v per row, as [rows, 1]."""
    products = torch.mul(dist.exp, values)
    return products.sum(-1, keepdim=True).mul_(dist.inv_total)


def _log1p_weighted(d: torch.Tensor, w_plus: float, w_minus: float) -> torch.Tensor:
    """log1p(w * expm1(-|d|)) with w = w_plus where d > 0 and w_minus where d < 0 (a new tensor).

    The building block of every log(x / mixture) of JSD and the skew KLs: for
    m = w x + (1 - w) y and t = log y - log x,
    log(x / m) = -(relu(t) + log1p(W expm1(-|t|))), W = 1 - w where t < 0, w where t > 0.
    Exact for nearly equal distributions (no cancellation between logs of similar
    size, unlike log x - log m) and for logits of +-30000 (no overflow).
    """
    terms = torch.abs(d).neg_().expm1_()
    if w_plus == w_minus:
        return terms.mul_(w_plus).log1p_()
    # W = mean + half_gap * sign(d) (at d = 0, expm1(0) = 0 makes W irrelevant);
    # copysign and two in-place passes: torch.where with scalar operands is several times slower.
    half_gap, mean = 0.5 * (w_plus - w_minus), 0.5 * (w_plus + w_minus)
    weights = torch.copysign(d.new_tensor(abs(half_gap)), d)  # copysign keeps only |half_gap|
    weights = weights.add_(mean) if half_gap > 0 else weights.neg_().add_(mean)
    return terms.mul_(weights).log1p_()


class Terms(NamedTuple):
    """A gradient sum_i tensor_i * coefficient_i (coefficients: [rows, 1] or floats)."""

    items: list


class Chain(NamedTuple):
    """A gradient through the softmax, q * g - q * <q, g>, stored as
    student.exp * (direction * scale + shift) with [rows, 1] scale and shift."""

    student_exp: torch.Tensor
    direction: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def scaled(self, factor: float | torch.Tensor) -> Chain:
        return Chain(self.student_exp, self.direction, self.scale * factor, self.shift * factor)


def _chain(student: Softmax, direction: torch.Tensor, factor: float = 1.0) -> Chain:
    """factor * q * (direction - <q, direction>): the softmax Jacobian applied to direction."""
    scale = student.inv_total * factor
    return Chain(student.exp, direction, scale, -_expectation(student, direction) * scale)


class Divergence(NamedTuple):
    values: torch.Tensor  # [rows]
    grad: Terms | Chain  # w.r.t. the temperature-scaled student logits


# Each objective may overwrite tensors it created, never the Softmax fields.


def _forward_kl(student: Softmax, teacher: Softmax) -> Divergence:
    values = _expectation(teacher, _log_ratio(teacher, student)).squeeze(-1)
    return Divergence(values, Terms([(student.exp, student.inv_total), (teacher.exp, -teacher.inv_total)]))


def _reverse_kl(student: Softmax, teacher: Softmax) -> Divergence:
    log_ratio = _log_ratio(student, teacher)
    values = _expectation(student, log_ratio)
    scale = student.inv_total
    return Divergence(values.squeeze(-1), Chain(student.exp, log_ratio, scale, -values * scale))


def _jsd(student: Softmax, teacher: Softmax, beta: float) -> Divergence:
    if beta <= 0.0:
        return _forward_kl(student, teacher)
    if beta >= 1.0:
        return _reverse_kl(student, teacher)
    # m = beta p + (1 - beta) q, d = log p - log q:
    # -log(q / m) = relu(d) + L and -log(p / m) = relu(-d) + L with one shared L.
    d = _log_ratio(teacher, student)
    shared = _log1p_weighted(d, 1.0 - beta, beta)
    student_neg = torch.clamp_min(d, 0.0).add_(shared)
    teacher_neg = shared.sub_(d.clamp_max_(0.0))
    teacher_term = _expectation(teacher, teacher_neg)
    student_term = _expectation(student, student_neg)
    values = (beta * teacher_term + (1.0 - beta) * student_term).neg_().squeeze(-1)
    # d/dq of both mixture KLs collapses to (1 - beta) * log(q / m) = -(1 - beta) * student_neg;
    # its expectation under q is -student_term, so the chain needs no extra sum.
    scale = student.inv_total * -(1.0 - beta)
    return Divergence(values, Chain(student.exp, student_neg, scale, -student_term * scale))


def _skew_forward_kl(student: Softmax, teacher: Softmax, skew: float) -> Divergence:
    # KL(p || m), m = a p + (1 - a) q: -log(p / m) = relu(-d) + log1p(W expm1(-|d|)), d = log p - log q.
    d = _log_ratio(teacher, student)
    teacher_neg = _log1p_weighted(d, 1.0 - skew, skew).sub_(d.clamp_max_(0.0))
    values = _expectation(teacher, teacher_neg).neg_().squeeze(-1)
    # g = -(1 - a) * p / m = -(1 - a) * exp(-teacher_neg)
    ratio = teacher_neg.neg_().exp_()
    return Divergence(values, _chain(student, ratio, -(1.0 - skew)))


def _skew_reverse_kl(student: Softmax, teacher: Softmax, skew: float) -> Divergence:
    # KL(q || m), m = (1 - a) p + a q: -log(q / m) = relu(d) + log1p(W expm1(-|d|)), d = log p - log q.
    d = _log_ratio(teacher, student)
    student_neg = _log1p_weighted(d, skew, 1.0 - skew).add_(d.clamp_min_(0.0))
    values = _expectation(student, student_neg).neg_().squeeze(-1)
    # g = log(q / m) - a * q / m = -student_neg - a * exp(-student_neg)
    direction = torch.neg(student_neg).exp_().mul_(skew).add_(student_neg)
    return Divergence(values, _chain(student, direction, -1.0))


def _tvd(student: Softmax, teacher: Softmax) -> Divergence:  # noqa: D103
    difference = torch.mul(teacher.exp, teacher.inv_total)
    difference.addcmul_(student.exp, -student.inv_total)
    values = 0.5 * difference.abs().sum(-1)
    # d|p - q|/dq = -sign(p - q); sign(0) = 0 like autograd's abs.
    return Divergence(values, _chain(student, difference.sign_(), -0.5))


def _cosine(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> Divergence:
    # Same eps handling as F.cosine_similarity: each norm clamped at 1e-8.
    student_norm = torch.linalg.vector_norm(student_logits, dim=-1, keepdim=True).clamp_min_(1e-8)
    teacher_norm = torch.linalg.vector_norm(teacher_logits, dim=-1, keepdim=True).clamp_min_(1e-8)
    student_unit = torch.div(student_logits, student_norm)
    teacher_unit = torch.div(teacher_logits, teacher_norm)
    cosine = torch.mul(student_unit, teacher_unit).sum(-1)
    grad = student_unit.mul_(cosine[:, None]).sub_(teacher_unit).div_(student_norm)
    return Divergence(1.0 - cosine, Terms([(grad, 1.0)]))


def _softmax_divergence(student: Softmax, teacher: Softmax, spec: LossSpec) -> Divergence:
    objective = spec.objective
    if objective == "forward_kl":
        return _forward_kl(student, teacher)
    if objective == "reverse_kl":
        return _reverse_kl(student, teacher)
    if objective == "jsd":
        return _jsd(student, teacher, spec.beta)
    if objective == "skew_forward_kl":
        return _skew_forward_kl(student, teacher, spec.skew_alpha)
    if objective == "skew_reverse_kl":
        return _skew_reverse_kl(student, teacher, spec.skew_alpha)
    if objective == "tvd":
        return _tvd(student, teacher)
    raise ValueError(f"unknown objective {objective!r}")


class _KD(NamedTuple):
    values: torch.Tensor
    grad: Terms | Chain  # kd_weight * d(values.sum())/d(raw student logits), on the top-k support if any
    top_ids: torch.Tensor | None
    student: Softmax | None  # softmax of the raw logits over the full vocabulary, for the CE


def _scaled(grad: Terms | Chain, factor: float) -> Terms | Chain:
    if factor == 1.0:
        return grad
    if isinstance(grad, Chain):
        return grad.scaled(factor)
    return Terms([(tensor, coefficient * factor) for tensor, coefficient in grad.items])


def _drop_rows(result: Divergence, dead: torch.Tensor | None) -> Divergence:
    """Zero value and gradient on rows where the teacher has no finite logit."""
    if dead is None:
        return result
    keep = (~dead).to(result.values.dtype)
    grad = result.grad
    if isinstance(grad, Chain):
        grad = Chain(grad.student_exp, grad.direction, grad.scale * keep, grad.shift * keep)
    else:
        grad = Terms([(tensor, coefficient * keep) for tensor, coefficient in grad.items])
    return Divergence(result.values * keep.squeeze(-1), grad)


def _distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec
) -> _KD:
    teacher_logits = teacher_logits.to(student_logits.dtype)
    top_ids = None
    if spec.top_k is not None:
        k = min(spec.top_k, teacher_logits.shape[-1])
        teacher_logits, top_ids = teacher_logits.topk(k, dim=-1)
        student_logits = student_logits.gather(-1, top_ids)
    excluded = dead = None
    if spec.teacher_may_be_infinite:
        # As divergences.token_divergence: -inf teacher columns leave both distributions.
        student_logits, teacher_logits, excluded, dead = excluded_columns(student_logits, teacher_logits)
    if spec.objective == "cosine":
        if excluded is not None:
            student_logits = student_logits.masked_fill(excluded, 0.0)
            teacher_logits = teacher_logits.masked_fill(excluded, 0.0)
        result = _drop_rows(_cosine(student_logits, teacher_logits), dead)
        return _KD(result.values, _scaled(result.grad, spec.kd_weight), top_ids, None)
    temperature = spec.temperature
    if temperature != 1.0:
        student_logits = torch.div(student_logits, temperature)
        teacher_logits = torch.div(teacher_logits, temperature)
    if excluded is not None:
        # Both sides get the same huge negative logit there: probability exactly 0,
        # finite logs, and the student's softmax renormalised over the real columns.
        lowest = torch.finfo(teacher_logits.dtype).min
        teacher_logits = teacher_logits.masked_fill(excluded, lowest)
        student_logits = student_logits.masked_fill(excluded, lowest)
    student = _softmax(student_logits)
    result = _drop_rows(_softmax_divergence(student, _softmax(teacher_logits), spec), dead)
    # T**2 on the value, T**2 / T on the gradient of the raw logits.
    values = result.values * temperature**2 if temperature != 1.0 else result.values
    shared = student if top_ids is None and temperature == 1.0 and excluded is None and dead is None else None
    return _KD(values, _scaled(result.grad, spec.kd_weight * temperature), top_ids, shared)


class _CE(NamedTuple):
    values: torch.Tensor
    softmax_term: tuple  # (student exp, ce_weight / total per row): ce_weight * softmax
    safe_labels: torch.Tensor
    onehot_weight: torch.Tensor  # -ce_weight on counted rows, 0 on ignored ones, [rows, 1]


def _cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec, shared: Softmax | None
) -> _CE:
    """Hard-label CE on the raw logits, -log q[label] = logsumexp(z) - z[label]; its
    gradient ce_weight * (softmax - onehot) is left to the caller to assemble."""
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, 0)[:, None]
    softmax = shared if shared is not None else _softmax(student_logits)
    # logsumexp(z) - z[label] = log(total) - (z[label] - max): no large numbers cancel.
    values = softmax.log_total.squeeze(-1) - softmax.shifted.gather(-1, safe_labels).squeeze(-1)
    coefficient = softmax.inv_total * spec.ce_weight
    if spec.labels_may_be_ignored:
        values = torch.where(valid, values, 0.0)
        coefficient = coefficient * valid[:, None]
    onehot_weight = valid.to(values.dtype)[:, None] * -spec.ce_weight
    return _CE(values, (softmax.exp, coefficient), safe_labels, onehot_weight)


def _materialize(grad: Terms | Chain, out: torch.Tensor | None) -> torch.Tensor | None:
    """The dense gradient of a Terms or Chain, written into `out` when given."""
    if isinstance(grad, Chain):
        # Two cheap passes: addcmul with [rows, 1] operands takes a slow unvectorised path.
        combined = grad.direction.mul_(grad.scale).add_(grad.shift)
        return torch.mul(combined, grad.student_exp, out=out)
    result = None
    for tensor, coefficient in grad.items:
        if result is None:
            result = torch.mul(tensor, coefficient, out=out)
        elif isinstance(coefficient, torch.Tensor):
            result.addcmul_(tensor, coefficient)
        else:
            result.add_(tensor, alpha=coefficient)
    return result


def _with_cross_entropy(grad: Terms | Chain, ce: _CE, shares_softmax: bool) -> Terms | Chain:
    """Add ce_weight * softmax to a KD gradient; free when the KD's softmax is the CE's."""
    exp, coefficient = ce.softmax_term
    if isinstance(grad, Chain) and shares_softmax:
        return Chain(grad.student_exp, grad.direction, grad.scale, grad.shift + coefficient)
    if isinstance(grad, Chain):
        grad = Terms([(_materialize(grad, None), 1.0)])
    return Terms([*grad.items, (exp, coefficient)])


def block_loss_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    spec: LossSpec,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of KD values, sum of CE values, d(loss sum)/d(student logits)) for a block.

    loss = ce_weight * CE + kd_weight * KD per row, as in per_token_distillation_loss.
    The gradient is written into `out` when given (it may alias student_logits).
    """
    kd = _distillation(student_logits, teacher_logits, spec) if spec.use_kd else None
    ce = None
    if spec.use_ce:
        ce = _cross_entropy(student_logits, labels, spec, None if kd is None else kd.student)
    dense = Terms([])
    if kd is not None and kd.top_ids is None:
        dense = kd.grad if ce is None else _with_cross_entropy(kd.grad, ce, kd.student is not None)
    elif ce is not None:
        dense = Terms([ce.softmax_term])
    grad = _materialize(dense, out)
    if grad is None:
        grad = torch.zeros_like(student_logits) if out is None else out.zero_()
    if ce is not None:
        grad.scatter_add_(-1, ce.safe_labels, ce.onehot_weight)
    if kd is not None and kd.top_ids is not None:
        grad.scatter_add_(-1, kd.top_ids, _materialize(kd.grad, None))
    kd_sum = kd.values.sum() if kd is not None else student_logits.new_zeros(())
    ce_sum = ce.values.sum() if ce is not None else student_logits.new_zeros(())
    return kd_sum, ce_sum, grad


# Tests swap in "aot_eager" to check tracing without paying for C++ code generation.
COMPILE_BACKEND = "inductor"
_compiled_blocks: dict[str, object] = {}


def compiled_block_loss_and_grad():
    """`block_loss_and_grad` through torch.compile, built once per process and backend."""
    if COMPILE_BACKEND not in _compiled_blocks:
        # Static shapes: callers pass one block shape (see fused._compiled_chunk_loss_and_grad).
        _compiled_blocks[COMPILE_BACKEND] = torch.compile(
            block_loss_and_grad, backend=COMPILE_BACKEND, dynamic=False
        )
    return _compiled_blocks[COMPILE_BACKEND]
