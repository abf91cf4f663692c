"""The loss functions at their edges, each against a float64 reference written here.

- masked positions holding NaN / +-inf never touch the value or the gradient (plain, sparse);
- teacher columns of -inf (padded vocabulary) leave both distributions, the student being
  renormalised over the real columns, in the plain and the fused path, for every objective;
- out-of-range parameters raise in every public loss function;
- the fused path's VALUE of JSD and the skew KLs is as precise as the plain path's
  (logits of +-30000: ln 2; small logits with beta 0.1).

    .venv/bin/pytest tests/unit/test_loss_edges.py -q
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from alambic.errors import ConfigError
from alambic.losses import OBJECTIVES, distillation_loss, per_token_distillation_loss, token_divergence
from alambic.losses.fused import fused_distillation_loss
from alambic.losses.sparse import (
    fused_sparse_distillation_loss,
    sparse_per_token_distillation_loss,
    sparse_token_divergence,
)

SOFTMAX_OBJECTIVES = [o for o in OBJECTIVES if o != "cosine"]


@contextmanager
def _float64():
    """The plain path casts to fp32 with .float(); keep float64 inputs float64 for references."""
    original = torch.Tensor.float

    def keep(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep):
        yield


def _reference_row(student_row, teacher_row, objective, beta=0.5, skew_alpha=0.1):
    """Straight from the definitions, float64, on the columns given."""
    if objective == "cosine":
        return 1 - float(student_row @ teacher_row) / float(student_row.norm() * teacher_row.norm())
    q, p = torch.softmax(student_row.double(), -1), torch.softmax(teacher_row.double(), -1)

    def kl(a, b):
        keep = a > 0
        return float((a[keep] * (a[keep] / b[keep]).log()).sum())

    if objective == "forward_kl":
        return kl(p, q)
    if objective == "reverse_kl":
        return kl(q, p)
    if objective == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if objective == "skew_forward_kl":
        return kl(p, skew_alpha * p + (1 - skew_alpha) * q)
    if objective == "skew_reverse_kl":
        return kl(q, (1 - skew_alpha) * p + skew_alpha * q)
    return 0.5 * float((p - q).abs().sum())


# ---- masked non-finite positions ------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("-inf"), float("inf")])
@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd", "cosine"])
def test_masked_non_finite_positions_never_touch_the_plain_result(poison, objective):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    mask = torch.rand(3, 5, generator=generator) > 0.4
    mask[0, 0], mask[0, 1] = True, False
    poisoned_student, poisoned_teacher = student.clone(), teacher.clone()
    poisoned_student[~mask] = poison
    poisoned_teacher[~mask] = poison
    leaf = poisoned_student.clone().requires_grad_()
    options = {"objective": objective, "alpha": 0.5, "beta": 0.3}
    got = distillation_loss(leaf, poisoned_teacher, labels, mask=mask, **options)
    got["loss"].backward()
    # Reference: the counted positions alone, in float64.
    counted = student[mask].clone().requires_grad_()
    with _float64():
        want = distillation_loss(counted, teacher[mask], labels[mask], **options)
    want["loss"].backward()
    for name in ("loss", "kd", "ce"):
        assert float(got[name].detach()) == pytest.approx(float(want[name].detach()), rel=1e-6)
    assert torch.isfinite(leaf.grad).all()
    assert float(leaf.grad[~mask].abs().max()) == 0.0
    torch.testing.assert_close(leaf.grad[mask], counted.grad, rtol=1e-5, atol=1e-7)


def test_masked_non_finite_positions_never_touch_the_sparse_result():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 13, generator=generator, dtype=torch.float64)
    top_lp, top_ids = torch.randn(4, 13, generator=generator, dtype=torch.float64).log_softmax(-1).topk(4, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1))
    labels = torch.randint(0, 13, (4,), generator=generator)
    mask = torch.tensor([True, False, True, False])
    bad_student, bad_lp, bad_tail = student.clone(), top_lp.clone(), tail.clone()
    bad_student[~mask], bad_lp[~mask], bad_tail[~mask] = float("nan"), float("nan"), float("nan")
    leaf = bad_student.clone().requires_grad_()
    got = sparse_per_token_distillation_loss(leaf, top_ids, bad_lp, bad_tail, labels, alpha=0.5, mask=mask)
    got["loss"].sum().backward()
    want = sparse_per_token_distillation_loss(student[mask], top_ids[mask], top_lp[mask], tail[mask], labels[mask], alpha=0.5)
    assert float(got["loss"].sum().detach()) == pytest.approx(float(want["loss"].sum()), rel=1e-6)
    assert torch.isfinite(leaf.grad).all() and float(leaf.grad[~mask].abs().max()) == 0.0


# ---- -inf teacher columns (padded vocabulary) ---------------------------------------------


def _padded_case(seed=2, rows=7, real=40, padded=8):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(real + padded, 6, generator=generator, dtype=torch.float64)
    teacher = torch.randn(rows, real + padded, generator=generator, dtype=torch.float64) * 2
    teacher[:, real:] = float("-inf")
    teacher[3, 5] = float("-inf")  # a banned token in one row only
    return hidden, weight, teacher


def _reference_excluding(hidden, weight, teacher, objective, beta):
    """Float64 sum over rows on each row's real columns only, and its gradient w.r.t. hidden."""
    hidden = hidden.clone().requires_grad_()
    logits = hidden @ weight.T
    total = 0.0
    for row in range(len(teacher)):
        real = torch.isfinite(teacher[row])
        value = _reference_tensor(logits[row][real], teacher[row][real], objective, beta)
        total = total + value
    total.backward()
    return float(total.detach()), hidden.grad


def _reference_tensor(student_row, teacher_row, objective, beta):
    # A differentiable version of _reference_row (float64 autograd), same definitions.
    if objective == "cosine":
        return 1 - (student_row @ teacher_row) / (student_row.norm() * teacher_row.norm())
    log_q, log_p = student_row.log_softmax(-1), teacher_row.log_softmax(-1)
    q, p = log_q.exp(), log_p.exp()
    if objective == "forward_kl":
        return (p * (log_p - log_q)).sum()
    if objective == "reverse_kl" or (objective == "jsd" and beta == 1.0):
        return (q * (log_q - log_p)).sum()
    if objective == "jsd":
        log_m = (beta * p + (1 - beta) * q).log()
        return beta * (p * (log_p - log_m)).sum() + (1 - beta) * (q * (log_q - log_m)).sum()
    if objective == "skew_forward_kl":
        return (p * (log_p - (0.1 * p + 0.9 * q).log())).sum()
    if objective == "skew_reverse_kl":
        return (q * (log_q - (0.9 * p + 0.1 * q).log())).sum()
    return 0.5 * (p - q).abs().sum()


@pytest.mark.parametrize(
    "objective,beta", [(o, 0.5) for o in OBJECTIVES] + [("jsd", 1.0)], ids=lambda v: str(v)
)
def test_minus_inf_teacher_columns_leave_both_distributions_plain_and_fused(objective, beta):
    hidden, weight, teacher = _padded_case()
    expected, expected_grad = _reference_excluding(hidden, weight, teacher, objective, beta)
    # plain path
    leaf = hidden.clone().requires_grad_()
    with _float64():
        plain = token_divergence(leaf @ weight.T, teacher, objective, beta=beta).sum()
    plain.backward()
    assert float(plain.detach()) == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-9, atol=1e-12)
    # fused path, float64 and fp32
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        leaf = hidden.to(dtype, copy=True).requires_grad_()
        fused = fused_distillation_loss(
            leaf, weight.to(dtype), None, None, None, teacher_logits=teacher.to(dtype), objective=objective,
            beta=beta, chunk_size=3,
        )["loss"]
        fused.backward()
        assert float(fused.detach()) == pytest.approx(expected, rel=tolerance)
        torch.testing.assert_close(leaf.grad.double(), expected_grad, rtol=tolerance * 10, atol=tolerance)


def test_a_position_without_any_finite_teacher_logit_has_zero_divergence():
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, dtype=torch.float64)
    teacher[1] = float("-inf")
    for objective in OBJECTIVES:
        student.grad = None
        values = token_divergence(student, teacher, objective)
        values.sum().backward()
        assert float(values[1].detach()) == 0.0 and float(student.grad[1].abs().max()) == 0.0
        assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()
        value, grad = _fused_value(student.detach(), teacher, objective=objective)
        assert torch.isfinite(grad).all() and float(grad[1].abs().max()) == 0.0
        with _float64():
            expected = token_divergence(student.detach(), teacher, objective).sum()
        assert value == pytest.approx(float(expected), rel=1e-10, abs=1e-12)


# ---- parameters out of range ----------------------------------------------------------------

BAD_PARAMETERS = [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 0.0), ("temperature", -1.0),
    ("beta", -0.1), ("beta", 1.5), ("beta", float("nan")),
    ("top_k", 0), ("top_k", -3),
    ("skew_alpha", 0.0), ("skew_alpha", 1.0), ("skew_alpha", -0.5), ("skew_alpha", float("nan")),
    ("alpha", -0.1), ("alpha", 1.5), ("alpha", float("nan")),
    ("logit_softcap", 0.0), ("logit_softcap", float("inf")),
]


def _calls():
    """(name, parameters it takes, callable(**bad)) for each public loss function."""
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    labels = torch.randint(0, 9, (4,))
    top_lp, top_ids = teacher.log_softmax(-1).topk(3, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1))
    hidden, weight = torch.randn(4, 5), torch.randn(9, 5)
    sparse = {"topk_ids": top_ids, "topk_logprobs": top_lp, "tail_logmass": tail}
    everything = {"temperature", "beta", "skew_alpha", "top_k", "alpha", "logit_softcap"}
    no_alpha, no_top_k = everything - {"alpha"}, everything - {"top_k"}
    return [
        ("token_divergence", no_alpha, lambda **kw: token_divergence(student, teacher, "jsd", **kw)),
        ("per_token_distillation_loss", everything, lambda **kw: per_token_distillation_loss(student, teacher, labels, **kw)),
        ("distillation_loss", everything, lambda **kw: distillation_loss(student, teacher, labels, **kw)),
        ("sparse_token_divergence", no_alpha - {"top_k"},
         lambda **kw: sparse_token_divergence(student, top_ids, top_lp, tail, **kw)),
        ("sparse_per_token_distillation_loss", no_top_k,
         lambda **kw: sparse_per_token_distillation_loss(student, top_ids, top_lp, tail, labels, **kw)),
        ("fused_distillation_loss", everything,
         lambda **kw: fused_distillation_loss(hidden, weight, None, labels, None, teacher_logits=teacher, **kw)),
        ("fused_sparse_distillation_loss", no_top_k,
         lambda **kw: fused_sparse_distillation_loss(hidden, weight, None, labels, None, **sparse, **kw)),
    ]


@pytest.mark.parametrize("parameter,value", BAD_PARAMETERS, ids=lambda v: str(v))
def test_every_loss_function_refuses_parameters_out_of_range(parameter, value):
    for name, takes, call in _calls():
        if parameter not in takes:
            continue
        with pytest.raises(ValueError, match=parameter) as caught:
            call(**{parameter: value})
        assert isinstance(caught.value, ConfigError), name  # exit 2 with a message from the CLI
        assert "fix:" in str(caught.value)


def test_parameters_at_the_ends_of_their_ranges_are_accepted():
    for _, takes, call in _calls():
        for parameter, value in (("beta", 0.0), ("beta", 1.0), ("alpha", 0.0), ("alpha", 1.0), ("top_k", 1)):
            if parameter in takes:
                assert torch.isfinite(_first(call(**{parameter: value}))).all()


def _first(result):
    return result["loss"].detach() if isinstance(result, dict) else result


# ---- precision of the fused path's reported value --------------------------------------------


def _fused_value(student_logits, teacher_logits, **options):
    """Value and d/d(student logits) of the fused path fed exactly these logits:
    identity hidden states, the logits (transposed) as the head weight."""
    rows = student_logits.shape[0]
    head = student_logits.T.contiguous().requires_grad_()
    out = fused_distillation_loss(
        torch.eye(rows, dtype=student_logits.dtype), head, None, None, None, teacher_logits=teacher_logits,
        chunk_size=rows, **options,
    )
    out["loss"].backward()
    return float(out["loss"].detach()), head.grad.T


def _float64_value(student_logits, teacher_logits, **options):
    student = student_logits.double().requires_grad_()
    with _float64():
        value = token_divergence(student, teacher_logits.double(), **options).sum()
    value.backward()
    return float(value.detach()), student.grad


@pytest.mark.parametrize("objective", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_fused_value_with_logits_of_30000_is_exact(objective):
    rows, vocab = 6, 50
    student = torch.full((rows, vocab), -30000.0)
    teacher = torch.full((rows, vocab), -30000.0)
    student[:, 0], teacher[:, 1] = 30000.0, 30000.0  # disjoint supports
    value, _ = _fused_value(student, teacher, objective=objective, beta=0.5, skew_alpha=0.1)
    expected = {"jsd": math.log(2), "skew_forward_kl": -math.log(0.1), "skew_reverse_kl": -math.log(0.1)}[objective]
    assert value / rows == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "objective,beta,scale",
    [("jsd", 0.1, 0.05), ("jsd", 0.5, 0.05), ("jsd", 0.9, 3.0), ("skew_forward_kl", 0.5, 0.05),
     ("skew_reverse_kl", 0.5, 0.05), ("jsd", 0.5, 3000.0), ("skew_reverse_kl", 0.5, 3000.0)],
)
def test_fused_fp32_value_and_gradient_as_precise_as_the_plain_path(objective, beta, scale):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(16, 2000, generator=generator) * scale
    teacher = torch.randn(16, 2000, generator=generator) * scale
    options = {"objective": objective, "beta": beta, "skew_alpha": 0.1}
    reference, reference_grad = _float64_value(student, teacher, **options)
    fused, fused_grad = _fused_value(student, teacher, **options)
    plain_leaf = student.clone().requires_grad_()
    plain = token_divergence(plain_leaf, teacher, **options).sum()
    plain.backward()
    plain_error = abs(float(plain.detach()) - reference) / abs(reference)
    fused_error = abs(fused - reference) / abs(reference)
    assert fused_error <= max(plain_error, 1e-6), (fused_error, plain_error)
    # Logits of thousands give one-hot distributions whose gradients are ~0: absolute floor 1e-6.
    gradient_error = float((fused_grad.double() - reference_grad).norm())
    assert gradient_error <= 1e-5 * float(reference_grad.norm()) + 1e-6
