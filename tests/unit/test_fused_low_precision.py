"""bf16 / fp16 heads: the fused loss runs its GEMMs in the inputs' dtype.

Reference: the plain path on the same bf16 values lifted to float64 (exact logits
of these inputs). Tolerances, chosen from bf16's 8-bit mantissa (relative step
2**-8 = 3.9e-3): the loss, KD and CE within 1e-2 relative, every gradient with
cosine similarity > 0.999 and relative error in norm < 2e-2 (bf16 logits carry
errors of |z| * 2**-9, and the weight gradient takes one bf16 rounding per chunk).
The fused bf16 result must also be about as close to the reference as the plain
path that forms bf16 logits (within 1.5x of its error). fp32 inputs, and heads whose
hidden states and weight differ in dtype, keep the exact fp32 path bit for bit.

    .venv/bin/pytest tests/unit/test_fused_low_precision.py -q
"""

from __future__ import annotations

import pytest
import torch

from helpers import largest_tensor_recorder
from alambic.losses.divergences import per_token_distillation_loss
from alambic.losses.fused import fused_distillation_loss

ROWS, WIDTH, VOCAB, TEACHER_WIDTH = 64, 32, 256, 48


def _case(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    labels[::7] = -100
    return {
        "hidden": torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64),
        "weight": torch.randn(VOCAB, WIDTH, generator=gen, dtype=torch.float64) * WIDTH**-0.5 * 2,
        "bias": torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 0.5,
        "teacher_hidden": torch.randn(ROWS, TEACHER_WIDTH, generator=gen, dtype=torch.float64),
        "teacher_weight": torch.randn(VOCAB, TEACHER_WIDTH, generator=gen, dtype=torch.float64) * TEACHER_WIDTH**-0.5 * 3,
        "labels": labels,
    }


def _cast(case, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.items()}


def _leaves(case, bias):
    names = ("hidden", "weight", "bias") if bias else ("hidden", "weight")
    return [case[name].clone().requires_grad_() for name in names]


def _fused(case, *, bias=True, teacher="head", **options):
    leaves = _leaves(case, bias)
    teacher_args = {"teacher_hidden": case["teacher_hidden"], "teacher_head_weight": case["teacher_weight"]}
    if teacher == "logits":
        teacher_args = {"teacher_logits": case["teacher_hidden"] @ case["teacher_weight"].T}
    out = fused_distillation_loss(
        leaves[0], leaves[1], leaves[2] if bias else None, case["labels"], None, **teacher_args, **options
    )
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, [t.grad for t in leaves]


def _plain(case, *, bias=True, reduction="sum", **options):
    options.pop("chunk_size", None)
    leaves = _leaves(case, bias)
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias else 0)
    teacher_logits = case["teacher_hidden"] @ case["teacher_weight"].T
    per_token = per_token_distillation_loss(logits.float(), teacher_logits.float(), case["labels"], **options)
    counted = case["labels"] != -100
    divisor = int(counted.sum()) if reduction == "mean" else 1
    out = {name: (values * counted).sum() / divisor for name, values in per_token.items()}
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, [t.grad for t in leaves]


def _relative(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def _cosine(actual, expected) -> float:
    return float(torch.nn.functional.cosine_similarity(actual.double().flatten(), expected.double().flatten(), dim=0))


SETTINGS = [
    {"objective": "jsd", "beta": 0.5, "alpha": 0.5, "reduction": "mean"},
    {"objective": "forward_kl", "temperature": 2.0},
    {"objective": "reverse_kl", "alpha": 0.3, "bias": False},
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["objective"])
def test_low_precision_gemms_match_the_exact_reference(dtype, settings):
    settings = dict(settings)
    bias = settings.pop("bias", True)
    low = _cast(_case(seed=3), dtype)
    # chunk 8: 8 chunks, so the weight gradient is accumulated (and rounded) 8 times.
    fused_out, fused_grads = _fused(low, bias=bias, chunk_size=8, **settings)
    exact_out, exact_grads = _plain(_cast(low, torch.float64), bias=bias, **settings)
    plain_out, plain_grads = _plain(low, bias=bias, **settings)
    assert [g.dtype for g in fused_grads] == [dtype] * len(fused_grads)
    for name in ("loss", "kd", "ce"):
        expected = float(exact_out[name])
        assert float(fused_out[name]) == pytest.approx(expected, rel=1e-2, abs=1e-4), name
    for fused_grad, exact_grad, plain_grad in zip(fused_grads, exact_grads, plain_grads):
        assert _cosine(fused_grad, exact_grad) > 0.999
        assert _relative(fused_grad, exact_grad) < 2e-2
        assert _relative(fused_grad, exact_grad) < 1.5 * _relative(plain_grad, exact_grad) + 1e-3


def test_dense_teacher_logits_with_a_bf16_student_head():
    low = _cast(_case(seed=4), torch.bfloat16)
    options = {"objective": "jsd", "alpha": 0.5, "chunk_size": 16}
    fused_out, fused_grads = _fused(low, teacher="logits", **options)
    exact_out, exact_grads = _plain(_cast(low, torch.float64), **options)
    assert float(fused_out["loss"]) == pytest.approx(float(exact_out["loss"]), rel=1e-2)
    assert all(_cosine(a, b) > 0.999 for a, b in zip(fused_grads, exact_grads))


def _exactly_equal(first, second) -> bool:
    (out_a, grads_a), (out_b, grads_b) = first, second
    return all(torch.equal(out_a[k], out_b[k]) for k in out_a) and all(
        torch.equal(a, b) for a, b in zip(grads_a, grads_b)
    )


def test_fp32_and_mixed_dtype_heads_keep_the_exact_fp32_path():
    options = {"objective": "jsd", "alpha": 0.5, "chunk_size": 16}
    fp32 = _cast(_case(seed=5), torch.float32)
    assert _exactly_equal(_fused(fp32, **options), _fused(fp32, fp32_matmul=True, **options))
    mixed = dict(fp32, hidden=fp32["hidden"].bfloat16(), teacher_hidden=fp32["teacher_hidden"].bfloat16())
    assert _exactly_equal(_fused(mixed, **options), _fused(mixed, fp32_matmul=True, **options))


def test_fp32_matmul_option_differs_for_bf16_heads():
    low = _cast(_case(seed=6), torch.bfloat16)
    options = {"objective": "jsd", "alpha": 0.5, "chunk_size": 16}
    assert not _exactly_equal(_fused(low, **options), _fused(low, fp32_matmul=True, **options))



def test_bf16_heads_make_no_fp32_copy_of_a_head_weight_or_its_gradient():
    low = _cast(_case(seed=7), torch.bfloat16)
    chunk = 8  # chunk * VOCAB fp32 logits are 4x smaller than a [VOCAB, WIDTH] fp32 weight
    with largest_tensor_recorder(torch.float32) as largest:
        _fused(low, chunk_size=chunk, objective="jsd", alpha=0.5)
    assert largest.largest <= chunk * VOCAB < VOCAB * WIDTH
    fp32 = _cast(low, torch.float32)
    with largest_tensor_recorder(torch.float32) as largest:
        _fused(fp32, chunk_size=chunk, objective="jsd", alpha=0.5)
    assert largest.largest >= VOCAB * WIDTH  # the check can fail: fp32 heads do hold fp32 weight tensors
