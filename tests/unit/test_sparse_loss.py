"""Sparse (top-k + tail bucket) distillation losses against dense references and hand values."""

from __future__ import annotations

import math

import pytest
import torch

from alambic.errors import ConfigError
from alambic.losses import OBJECTIVES, token_divergence
from alambic.losses.sparse import (
    check_cache_temperature,
    fused_sparse_distillation_loss,
    sparse_per_token_distillation_loss,
    sparse_token_divergence,
)

PROBABILITY_OBJECTIVES = [o for o in OBJECTIVES if o != "cosine"]


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_logprobs, tail


@pytest.mark.parametrize("objective", PROBABILITY_OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_support_matches_the_dense_divergence(objective, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 17), torch.randn(3, 5, 17) * 2
    ids, logprobs, tail = teacher_topk(teacher, 17, temperature)
    # Shuffle the cached order: the loss must not depend on it.
    permutation = torch.randperm(17)
    sparse = sparse_token_divergence(
        student, ids[..., permutation], logprobs[..., permutation], tail, objective, temperature, 0.3, 0.2
    )
    dense = token_divergence(student, teacher, objective, temperature, 0.3, 0.2)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_three_token_vocab_by_hand():
    teacher_probs = [0.5, 0.3, 0.2]
    student_logits = torch.tensor([[1.0, 0.0, -1.0]])
    q = torch.softmax(student_logits, -1)[0].tolist()
    ids = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[math.log(0.5), math.log(0.3)]])
    tail = torch.tensor([math.log(0.2)])
    # With V = 3 and k = 2 the bucket is a single token, so the bucketed KL is the full one.
    forward = sum(p * math.log(p / s) for p, s in zip(teacher_probs, q))
    reverse = sum(s * math.log(s / p) for p, s in zip(teacher_probs, q))
    tvd = 0.5 * sum(abs(p - s) for p, s in zip(teacher_probs, q))
    for objective, expected in (("forward_kl", forward), ("reverse_kl", reverse), ("tvd", tvd)):
        value = sparse_token_divergence(student_logits, ids, logprobs, tail, objective)
        assert value.item() == pytest.approx(expected, rel=1e-5), objective


def test_tail_bucket_is_a_lower_bound_exact_on_the_support():
    # V = 4, k = 2: teacher tail {2, 3} = 0.15 + 0.05; student tail = q2 + q3.
    teacher_probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    student_logits = torch.tensor([[0.5, 0.2, -1.0, 0.3]])
    q = torch.softmax(student_logits, -1)[0]
    ids = torch.tensor([[1, 0]])
    logprobs = teacher_probs[[1, 0]].log()[None]
    tail = torch.tensor([math.log(0.2)])
    value = sparse_token_divergence(student_logits, ids, logprobs, tail, "forward_kl").item()
    by_hand = sum(teacher_probs[i] * math.log(teacher_probs[i] / q[i]) for i in (0, 1))
    by_hand += 0.2 * math.log(0.2 / (q[2] + q[3]))
    assert value == pytest.approx(float(by_hand), rel=1e-5)
    full = token_divergence(student_logits, teacher_probs.log()[None], "forward_kl").item()
    assert value < full


@pytest.mark.parametrize("objective", PROBABILITY_OBJECTIVES)
def test_bucketed_value_never_exceeds_the_full_divergence(objective):
    torch.manual_seed(1)
    student, teacher = torch.randn(64, 50) * 2, torch.randn(64, 50) * 2
    ids, logprobs, tail = teacher_topk(teacher, 8)
    sparse = sparse_token_divergence(student, ids, logprobs, tail, objective, 1.0, 0.5, 0.1)
    dense = token_divergence(student, teacher, objective, 1.0, 0.5, 0.1)
    assert (sparse <= dense + 1e-5).all()
    assert (sparse >= -1e-6).all()


def test_cosine_and_temperature_mismatch_are_config_errors():
    ids, logprobs, tail = teacher_topk(torch.randn(2, 9), 3)
    with pytest.raises(ConfigError, match="cosine"):
        sparse_token_divergence(torch.randn(2, 9), ids, logprobs, tail, "cosine")
    with pytest.raises(ConfigError, match="temperature 2.0") as caught:
        check_cache_temperature(2.0, 1.0)
    assert "loss.temperature=2.0" in caught.value.hint
    check_cache_temperature(2.0, 2.0)


def test_no_nan_gradient_when_the_teacher_tail_is_empty():
    student = torch.randn(4, 12, requires_grad=True)
    ids = torch.arange(6).expand(4, 6)
    logprobs = torch.full((4, 6), -math.log(6))
    tail = torch.full((4,), float("-inf"))
    for objective in PROBABILITY_OBJECTIVES:
        value = sparse_token_divergence(student, ids, logprobs, tail, objective).sum()
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), objective


def test_alpha_mixes_hard_label_cross_entropy():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 11)
    ids, logprobs, tail = teacher_topk(torch.randn(2, 3, 11), 4)
    labels = torch.tensor([[1, 2, -100], [0, 5, 6]])
    out = sparse_per_token_distillation_loss(student, ids, logprobs, tail, labels, alpha=0.25)
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, 11), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(out["ce"], ce.reshape(2, 3))
    torch.testing.assert_close(out["loss"], 0.25 * out["ce"] + 0.75 * out["kd"])


@pytest.mark.parametrize("objective,alpha,reduction", [("forward_kl", 0.3, "sum"), ("jsd", 0.0, "mean"), ("reverse_kl", 0.5, "mean")])
def test_fused_matches_the_plain_sparse_path(objective, alpha, reduction):
    torch.manual_seed(3)
    tokens, hidden_size, vocab, k = 37, 8, 29, 5
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::4] = -100
    mask = torch.rand(tokens) > 0.2
    ids, logprobs, tail = teacher_topk(torch.randn(tokens, vocab) * 2, k, temperature=2.0)
    options = {"objective": objective, "temperature": 2.0, "alpha": alpha, "beta": 0.4, "skew_alpha": 0.1}

    fused = fused_sparse_distillation_loss(
        hidden, weight, bias, labels, mask, topk_ids=ids, topk_logprobs=logprobs, tail_logmass=tail,
        chunk_size=8, reduction=reduction, **options,
    )
    fused_grads = torch.autograd.grad(fused["loss"] * 3.0, (hidden, weight, bias))

    logits = hidden @ weight.T + bias
    per_token = sparse_per_token_distillation_loss(logits, ids, logprobs, tail, labels, **options)
    weights = mask.float() / (mask.sum() if reduction == "mean" else 1)
    plain = {name: (values * weights).sum() for name, values in per_token.items()}
    plain_grads = torch.autograd.grad(plain["loss"] * 3.0, (hidden, weight, bias))

    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(fused[name], plain[name].detach(), atol=1e-5, rtol=1e-5)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_fused_without_bias_and_frozen_head():
    torch.manual_seed(4)
    hidden = torch.randn(10, 6, requires_grad=True)
    weight = torch.randn(13, 6)  # frozen: no gradient requested
    ids, logprobs, tail = teacher_topk(torch.randn(10, 13), 3)
    out = fused_sparse_distillation_loss(
        hidden, weight, None, None, None, topk_ids=ids, topk_logprobs=logprobs, tail_logmass=tail, chunk_size=4,
        reduction="mean",
    )
    (grad,) = torch.autograd.grad(out["loss"], hidden)
    reference = sparse_token_divergence(hidden @ weight.T, ids, logprobs, tail).mean()
    (expected,) = torch.autograd.grad(reference, hidden)
    torch.testing.assert_close(out["loss"], reference.detach())
    torch.testing.assert_close(grad, expected)


def test_fused_counts_labelled_rows_when_no_mask_is_given():
    torch.manual_seed(5)
    hidden = torch.randn(9, 4, requires_grad=True)
    weight = torch.randn(11, 4)
    labels = torch.tensor([1, -100, 3, 4, -100, 0, 2, 2, -100])
    ids, logprobs, tail = teacher_topk(torch.randn(9, 11), 3)
    options = {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logmass": tail, "alpha": 0.5}
    unmasked = fused_sparse_distillation_loss(hidden, weight, None, labels, None, **options)
    masked = fused_sparse_distillation_loss(hidden, weight, None, labels, labels != -100, **options)
    everything = fused_sparse_distillation_loss(hidden, weight, None, None, None, **options)
    torch.testing.assert_close(unmasked["loss"], masked["loss"])
    assert everything["kd"] > unmasked["kd"]  # the three unlabelled rows add KD terms


def test_fused_bf16_hidden_under_autocast_computes_fp32_logits():
    torch.manual_seed(6)
    hidden = torch.randn(12, 8).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(21, 8, requires_grad=True)
    ids, logprobs, tail = teacher_topk(torch.randn(12, 21), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_sparse_distillation_loss(
            hidden, weight, None, None, None, topk_ids=ids, topk_logprobs=logprobs, tail_logmass=tail, chunk_size=5
        )
    grad_hidden, grad_weight = torch.autograd.grad(out["loss"], (hidden, weight))
    assert grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    reference_hidden = hidden.detach().float().requires_grad_(True)
    reference = sparse_token_divergence(reference_hidden @ weight.T, ids, logprobs, tail).sum()
    expected_hidden, expected_weight = torch.autograd.grad(reference, (reference_hidden, weight))
    torch.testing.assert_close(out["loss"], reference.detach(), atol=1e-5, rtol=1e-5)  # fp32, not bf16, logits
    torch.testing.assert_close(grad_weight, expected_weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_hidden.float(), expected_hidden, atol=2e-2, rtol=2e-2)
