"""Per-block math of the fused LM-head loss: values and closed-form logit gradients.

`block_loss_and_grad` takes the student and teacher logits of a few rows and
returns the summed KD and CE values plus d(loss)/d(student logits), written by
hand for every objective so no autograd graph is built per chunk. The values
follow `alambic.losses.divergences` operation by operation (same log-softmax,
same products and sums), and tests/unit/test_fused_loss.py checks values and
gradients against autograd on that plain path.

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
import torch.nn.functional as F

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

    @property
    def use_kd(self) -> bool:
        return self.kd_weight != 0.0

    @property
    def use_ce(self) -> bool:
        return self.ce_weight != 0.0


class DivergenceGrad(NamedTuple):
    """Per-row divergence, its gradient in the scaled student logits, and a scalar
    factor still to apply to that gradient (kept apart to save a pass)."""

    values: torch.Tensor
    grad: torch.Tensor
    factor: float


def _row_dot(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return (left * right).sum(-1)


def _log_of_mixture(probs_a: torch.Tensor, probs_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b); clamped at the smallest normal so rows
    where both probabilities underflow give finite logs (their terms weigh 0)."""
    mixture = torch.lerp(probs_b, probs_a, weight_a)
    return mixture.clamp_min_(torch.finfo(mixture.dtype).tiny).log_()


def _softmax_chain(student_probs: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
    """q * (g - <q, g>) in place on g: the gradient through the softmax."""
    return dq.sub_(_row_dot(student_probs, dq)[:, None]).mul_(student_probs)


def _forward_kl(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> DivergenceGrad:
    teacher_probs = teacher_lp.exp()
    values = _row_dot(teacher_probs, teacher_lp - student_lp)
    return DivergenceGrad(values, student_lp.exp().sub_(teacher_probs), 1.0)


def _reverse_kl(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> DivergenceGrad:
    student_probs = student_lp.exp()
    log_ratio = student_lp - teacher_lp
    values = _row_dot(student_probs, log_ratio)
    grad = log_ratio.sub_(values[:, None]).mul_(student_probs)
    return DivergenceGrad(values, grad, 1.0)


def _jsd(student_lp: torch.Tensor, teacher_lp: torch.Tensor, beta: float) -> DivergenceGrad:
    if beta <= 0.0:
        return _forward_kl(student_lp, teacher_lp)
    if beta >= 1.0:
        return _reverse_kl(student_lp, teacher_lp)
    student_probs = student_lp.exp()
    teacher_probs = teacher_lp.exp()
    log_mixture = _log_of_mixture(teacher_probs, student_probs, beta)
    teacher_term = _row_dot(teacher_probs, teacher_lp - log_mixture)
    student_log_ratio = student_lp - log_mixture
    student_term = _row_dot(student_probs, student_log_ratio)
    values = beta * teacher_term + (1.0 - beta) * student_term
    # <q, log q - log m> is student_term itself, so the softmax chain needs no extra sum.
    grad = student_log_ratio.sub_(student_term[:, None]).mul_(student_probs)
    return DivergenceGrad(values, grad, 1.0 - beta)


def _skew_forward_kl(student_lp: torch.Tensor, teacher_lp: torch.Tensor, skew: float) -> DivergenceGrad:
    if skew <= 0.0:
        return _forward_kl(student_lp, teacher_lp)
    student_probs = student_lp.exp()
    teacher_probs = teacher_lp.exp()
    mixture = torch.lerp(student_probs, teacher_probs, skew)
    mixture.clamp_min_(torch.finfo(mixture.dtype).tiny)
    values = _row_dot(teacher_probs, teacher_lp - mixture.log())
    ratio = teacher_probs.div_(mixture)
    # g = -(1 - a) * p / m; the sign goes into the chain: q * (<q, r> - r).
    grad = _softmax_chain(student_probs, ratio).neg_()
    return DivergenceGrad(values, grad, 1.0 - skew)


def _skew_reverse_kl(student_lp: torch.Tensor, teacher_lp: torch.Tensor, skew: float) -> DivergenceGrad:
    if skew <= 0.0:
        return _reverse_kl(student_lp, teacher_lp)
    student_probs = student_lp.exp()
    mixture = torch.lerp(teacher_lp.exp(), student_probs, skew)
    mixture.clamp_min_(torch.finfo(mixture.dtype).tiny)
    log_ratio = student_lp - mixture.log()
    values = _row_dot(student_probs, log_ratio)
    dq = log_ratio.sub_(torch.div(student_probs, mixture).mul_(skew))
    return DivergenceGrad(values, _softmax_chain(student_probs, dq), 1.0)


def _tvd(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> DivergenceGrad:
    student_probs = student_lp.exp()
    difference = teacher_lp.exp().sub_(student_probs)
    values = 0.5 * difference.abs().sum(-1)
    # d|p - q|/dq = -sign(p - q)
    grad = _softmax_chain(student_probs, difference.sign_()).neg_()
    return DivergenceGrad(values, grad, 0.5)


def _cosine(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> DivergenceGrad:
    # Same eps handling as F.cosine_similarity: each norm clamped at 1e-8.
    student_norm = torch.linalg.vector_norm(student_logits, dim=-1, keepdim=True).clamp_min_(1e-8)
    teacher_norm = torch.linalg.vector_norm(teacher_logits, dim=-1, keepdim=True).clamp_min_(1e-8)
    student_unit = student_logits / student_norm
    teacher_unit = teacher_logits / teacher_norm
    cosine = _row_dot(student_unit, teacher_unit)
    grad = student_unit.mul_(cosine[:, None]).sub_(teacher_unit).div_(student_norm)
    return DivergenceGrad(1.0 - cosine, grad, 1.0)


def _softmax_divergence(
    student_lp: torch.Tensor, teacher_lp: torch.Tensor, spec: LossSpec
) -> DivergenceGrad:
    objective = spec.objective
    if objective == "forward_kl":
        return _forward_kl(student_lp, teacher_lp)
    if objective == "reverse_kl":
        return _reverse_kl(student_lp, teacher_lp)
    if objective == "jsd":
        return _jsd(student_lp, teacher_lp, spec.beta)
    if objective in ("skew_forward_kl", "skew_reverse_kl") and spec.skew_alpha >= 1.0:
        # The plain path defines a = 1 as a distribution compared with itself: 0.
        return DivergenceGrad(student_lp.new_zeros(student_lp.shape[0]), torch.zeros_like(student_lp), 0.0)
    if objective == "skew_forward_kl":
        return _skew_forward_kl(student_lp, teacher_lp, spec.skew_alpha)
    if objective == "skew_reverse_kl":
        return _skew_reverse_kl(student_lp, teacher_lp, spec.skew_alpha)
    if objective == "tvd":
        return _tvd(student_lp, teacher_lp)
    raise ValueError(f"unknown objective {objective!r}")


class _KDResult(NamedTuple):
    values: torch.Tensor
    grad: torch.Tensor  # kd_weight * d(values.sum())/d(student logits), on the top-k support if any
    top_ids: torch.Tensor | None
    student_logprobs: torch.Tensor | None  # log_softmax of the raw logits, reusable by the CE


def _scaled(grad: torch.Tensor, factor: float) -> torch.Tensor:
    return grad if factor == 1.0 else grad.mul_(factor)


def _distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec) -> _KDResult:
    teacher_logits = teacher_logits.to(student_logits.dtype)
    top_ids = None
    if spec.top_k is not None:
        k = min(spec.top_k, teacher_logits.shape[-1])
        teacher_logits, top_ids = teacher_logits.topk(k, dim=-1)
        student_logits = student_logits.gather(-1, top_ids)
    if spec.objective == "cosine":
        result = _cosine(student_logits, teacher_logits)
        return _KDResult(result.values, _scaled(result.grad, spec.kd_weight), top_ids, None)
    temperature = spec.temperature
    if temperature != 1.0:
        student_logits = student_logits / temperature
        teacher_logits = teacher_logits / temperature
    student_lp = F.log_softmax(student_logits, dim=-1)
    # A teacher logit of -inf (a banned or padded token) must weigh 0, not produce NaN.
    teacher_lp = F.log_softmax(teacher_logits, dim=-1).clamp_min_(torch.finfo(student_lp.dtype).min)
    result = _softmax_divergence(student_lp, teacher_lp, spec)
    # T**2 on the value, T**2 / T on the gradient of the raw logits.
    values = result.values * temperature**2 if temperature != 1.0 else result.values
    grad = _scaled(result.grad, spec.kd_weight * result.factor * temperature)
    reusable = student_lp if top_ids is None and temperature == 1.0 else None
    return _KDResult(values, grad, top_ids, reusable)


def _cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    student_logprobs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row hard-label CE on the raw logits and its gradient softmax - onehot."""
    if student_logprobs is None:
        student_logprobs = F.log_softmax(student_logits, dim=-1)
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, 0)[:, None]
    values = -student_logprobs.gather(-1, safe_labels).squeeze(-1)
    grad = student_logprobs.exp()
    grad.scatter_add_(-1, safe_labels, -valid.to(grad.dtype)[:, None])
    if spec.labels_may_be_ignored:
        values = torch.where(valid, values, 0.0)
        grad.mul_(valid[:, None])
    return values, grad


def block_loss_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of KD values, sum of CE values, d(loss sum)/d(student logits)) for a block.

    loss = ce_weight * CE + kd_weight * KD per row, as in per_token_distillation_loss.
    """
    kd_sum = student_logits.new_zeros(())
    ce_sum = student_logits.new_zeros(())
    kd = None
    if spec.use_kd:
        kd = _distillation(student_logits, teacher_logits, spec)
        kd_sum = kd.values.sum()
    grad = kd.grad if kd is not None and kd.top_ids is None else None
    if spec.use_ce:
        reusable = kd.student_logprobs if kd is not None else None
        ce_values, ce_grad = _cross_entropy(student_logits, labels, spec, reusable)
        ce_sum = ce_values.sum()
        grad = _scaled(ce_grad, spec.ce_weight) if grad is None else grad.add_(ce_grad, alpha=spec.ce_weight)
    if grad is None:
        grad = torch.zeros_like(student_logits)
    if kd is not None and kd.top_ids is not None:
        grad.scatter_add_(-1, kd.top_ids, kd.grad)
    return kd_sum, ce_sum, grad


_compiled_block = None


def compiled_block_loss_and_grad():
    """The same block function through torch.compile (built once per process)."""
    global _compiled_block
    if _compiled_block is None:
        _compiled_block = torch.compile(block_loss_and_grad, dynamic=None)
    return _compiled_block
