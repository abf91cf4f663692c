"""The fused chunked LM-head loss equals the plain per-token loss on full logits.

Reference: `per_token_distillation_loss` on `hidden @ weight.T + bias`, masked and
summed (or averaged), differentiated by autograd. Tolerances:
- float64 inputs: the fused math runs in float64 and must match the plain path
  lifted to float64 (its .float() casts made no-ops) to 1e-10 relative, for the
  loss and every gradient: this pins down each closed-form gradient exactly.
- fp32 inputs, against that float64 reference: loss within 1e-6 relative,
  gradients within 1e-5 relative in norm (the plain fp32 path is itself up to
  5e-6 off there: softmax gradients cancel, which no fp32 code escapes).
- bf16 inputs with fp32_matmul=True: within 2e-2 of the fp32 result on the same values, and closer
  to it than the plain path that forms bf16 logits.

    .venv/bin/pytest tests/unit/test_fused_loss.py -q
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from helpers import largest_tensor_recorder
from alambic.errors import ConfigError, DataError, ModelError
from alambic.losses import fused, fused_kernels, fused_threads
from alambic.losses.divergences import OBJECTIVES, distillation_loss, per_token_distillation_loss
from alambic.losses.fused import fused_distillation_loss

ROWS, WIDTH, VOCAB, TEACHER_WIDTH = 37, 16, 64, 24
DEFAULT_BLOCK_ELEMENTS = fused_threads.EAGER_BLOCK_ELEMENTS


@pytest.fixture(autouse=True)
def _blocks_of_three_rows(monkeypatch):
    """Small eager blocks, so every test crosses block and worker-thread boundaries."""
    monkeypatch.setattr(fused_threads, "EAGER_BLOCK_ELEMENTS", 3 * VOCAB)


def _case(seed: int = 0, rows: int = ROWS, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Float64 tensors of one problem; logits of a few units like a trained head."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = -100
    return {
        "hidden": torch.randn(rows, WIDTH, generator=gen, dtype=torch.float64),
        "weight": torch.randn(vocab, WIDTH, generator=gen, dtype=torch.float64) * 0.7,
        "bias": torch.randn(vocab, generator=gen, dtype=torch.float64),
        "teacher_hidden": torch.randn(rows, TEACHER_WIDTH, generator=gen, dtype=torch.float64),
        "teacher_weight": torch.randn(vocab, TEACHER_WIDTH, generator=gen, dtype=torch.float64) * 0.7,
        "teacher_bias": torch.randn(vocab, generator=gen, dtype=torch.float64),
        "labels": labels,
    }


def _teacher_logits(case):
    return case["teacher_hidden"] @ case["teacher_weight"].T + case["teacher_bias"]


@contextmanager
def _plain_path_in_float64():
    original = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep_float64):
        yield


def _leaves(case, dtype, bias=True):
    names = ("hidden", "weight", "bias") if bias else ("hidden", "weight")
    # copy=True: fresh leaves every time, so gradients never accumulate across runs.
    return [case[name].to(dtype, copy=True).requires_grad_() for name in names]


def _grads(leaves):
    assert all(t.grad is None or t.grad.dtype == t.dtype for t in leaves), "gradients keep the input dtype"
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def _plain(case, dtype, *, mask=None, labels="case", teacher=True, reduction="sum", bias=True, **options):
    labels = case["labels"] if labels == "case" else labels
    for fused_only in ("chunk_size", "compile"):
        options.pop(fused_only, None)
    leaves = _leaves(case, dtype, bias)
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias else 0)
    teacher_logits = _teacher_logits(case).to(dtype) if teacher else None
    with _plain_path_in_float64():
        per_token = per_token_distillation_loss(logits, teacher_logits, labels, **options)
    counted = mask
    if counted is None:
        counted = labels != -100 if labels is not None else torch.ones(len(logits), dtype=torch.bool)
    divisor = max(int(counted.sum()), 1) if reduction == "mean" else 1
    reduced = {name: (values * counted).sum() / divisor for name, values in per_token.items()}
    if reduced["loss"].requires_grad:
        reduced["loss"].backward()
    return reduced, _grads(leaves)


def _fused(case, dtype, *, mask=None, labels="case", teacher="head", bias=True, **options):
    labels = case["labels"] if labels == "case" else labels
    leaves = _leaves(case, dtype, bias)
    teacher_args = {}
    if teacher == "head":
        teacher_args = {
            "teacher_hidden": case["teacher_hidden"].to(dtype),
            "teacher_head_weight": case["teacher_weight"].to(dtype),
            "teacher_head_bias": case["teacher_bias"].to(dtype),
        }
    elif teacher == "logits":
        teacher_args = {"teacher_logits": _teacher_logits(case).to(dtype)}
    out = fused_distillation_loss(
        leaves[0], leaves[1], leaves[2] if bias else None, labels, mask, **teacher_args, **options
    )
    out["loss"].backward()
    return out, _grads(leaves)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def _assert_close(fused, plain, loss_tol, grad_tol):
    (fused_out, fused_grads), (plain_out, plain_grads) = fused, plain
    for name in ("loss", "kd", "ce"):
        expected = plain_out[name].detach().double()
        tolerance = loss_tol * max(abs(float(expected)), 1e-3)
        assert abs(float(fused_out[name].detach()) - float(expected)) <= tolerance, (name, fused_out[name], expected)
    for index, (actual, expected) in enumerate(zip(fused_grads, plain_grads)):
        if expected.abs().max() == 0:
            assert actual.abs().max() == 0, f"gradient {index} should be zero"
        else:
            assert _relative(actual, expected) <= grad_tol, (index, _relative(actual, expected))


SETTINGS = [
    {},
    {"temperature": 2.0, "alpha": 0.5},
    {"top_k": 5, "alpha": 0.3, "temperature": 0.7},
    {"alpha": 1.0},
]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_float64_matches_plain_path_exactly(objective, setting):
    options = {"objective": objective, "chunk_size": 8, **SETTINGS[setting]}
    teacher = "head" if setting % 2 == 0 else "logits"
    case = _case(seed=setting)
    _assert_close(
        _fused(case, torch.float64, teacher=teacher, **options),
        _plain(case, torch.float64, **options),
        1e-10,
        1e-10,
    )


@pytest.mark.parametrize(
    "options",
    [
        {"objective": "jsd", "beta": 0.0},
        {"objective": "jsd", "beta": 1.0},
        {"objective": "jsd", "beta": 0.9, "alpha": 0.5},
        {"objective": "skew_forward_kl", "skew_alpha": 1e-9},
        {"objective": "skew_reverse_kl", "skew_alpha": 1e-9},
        {"objective": "skew_forward_kl", "skew_alpha": 0.999},
        {"objective": "skew_reverse_kl", "skew_alpha": 0.5, "top_k": 3},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_float64_boundary_parameters(options):
    case = _case(seed=3)
    _assert_close(_fused(case, torch.float64, **options), _plain(case, torch.float64, **options), 1e-10, 1e-10)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("setting", [0, 2])
def test_fp32_is_within_documented_tolerance_of_float64(objective, setting):
    options = {"objective": objective, "chunk_size": 16, **SETTINGS[setting]}
    case = _case(seed=10 + setting, vocab=300)
    _assert_close(_fused(case, torch.float32, **options), _plain(case, torch.float64, **options), 1e-6, 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 1024])
def test_chunk_size_does_not_change_the_result(chunk_size):
    # 37 rows: ragged last chunk (8, 36), exact fit (37), chunk larger than N (1024).
    options = {"objective": "jsd", "alpha": 0.5, "chunk_size": chunk_size}
    case = _case(seed=4)
    _assert_close(_fused(case, torch.float64, **options), _plain(case, torch.float64, **options), 1e-10, 1e-10)


def test_explicit_mask_with_ignored_labels_inside_it():
    case = _case(seed=5)
    mask = torch.rand(ROWS, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0] = True  # row 0 has label -100: the KD counts there, the CE does not
    options = {"objective": "reverse_kl", "alpha": 0.5, "mask": mask, "chunk_size": 4}
    _assert_close(_fused(case, torch.float64, **options), _plain(case, torch.float64, **options), 1e-10, 1e-10)


def test_mean_reduction_equals_distillation_loss():
    case = _case(seed=6)
    options = {"objective": "tvd", "alpha": 0.5, "temperature": 1.5}
    fused_out, _ = _fused(case, torch.float64, teacher="logits", reduction="mean", **options)
    with _plain_path_in_float64():
        logits = case["hidden"] @ case["weight"].T + case["bias"]
        expected = distillation_loss(logits, _teacher_logits(case), case["labels"], **options)
    for name in ("loss", "kd", "ce"):
        assert float(fused_out[name].detach()) == pytest.approx(float(expected[name]), rel=1e-10)
    _assert_close(
        _fused(case, torch.float64, reduction="mean", **options),
        _plain(case, torch.float64, reduction="mean", **options),
        1e-10,
        1e-10,
    )


def test_without_teacher_the_loss_is_cross_entropy_and_without_labels_too_kd():
    case = _case(seed=7)
    _assert_close(
        _fused(case, torch.float64, teacher=None, chunk_size=5),
        _plain(case, torch.float64, teacher=False),
        1e-10,
        1e-10,
    )
    # No labels, no mask: every row counts for the KD.
    options = {"objective": "cosine", "alpha": 0.5, "labels": None, "chunk_size": 5}
    _assert_close(
        _fused(case, torch.float64, bias=False, **options),
        _plain(case, torch.float64, bias=False, **options),
        1e-10,
        1e-10,
    )


def test_nothing_to_learn_gives_zero_loss_and_zero_gradients():
    case = _case(seed=8)
    out, grads = _fused(case, torch.float64, teacher=None, labels=None)
    assert float(out["loss"].detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    all_ignored = torch.full((ROWS,), -100)
    out, grads = _fused(case, torch.float64, labels=all_ignored, objective="jsd", reduction="mean")
    assert float(out["loss"].detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_minus_inf_teacher_logits_weigh_zero_like_the_plain_path():
    case = _case(seed=9)
    teacher_logits = _teacher_logits(case)
    teacher_logits[:, VOCAB // 2 :] = float("-inf")  # e.g. a sparse cache densified
    hidden, weight, bias = _leaves(case, torch.float64)
    out = fused_distillation_loss(hidden, weight, bias, case["labels"], None, teacher_logits=teacher_logits)
    out["loss"].backward()
    logits = case["hidden"] @ case["weight"].T + case["bias"]
    with _plain_path_in_float64():
        expected = per_token_distillation_loss(logits, teacher_logits, case["labels"])["loss"]
    assert torch.isfinite(out["loss"]) and torch.isfinite(weight.grad).all()
    assert float(out["loss"].detach()) == pytest.approx(float(expected[case["labels"] != -100].sum()), rel=1e-10)


def test_bf16_logits_are_formed_in_fp32_with_fp32_matmul():
    case = _case(seed=11, rows=64, vocab=512)
    options = {"objective": "jsd", "alpha": 0.5, "chunk_size": 16}
    bf16_case = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in case.items()}
    fused_out, fused_grads = _fused(bf16_case, torch.bfloat16, fp32_matmul=True, **options)
    # Same bf16 values upcast: what exact fp32 logits of these inputs give.
    upcast = {k: (v.double() if v.is_floating_point() else v) for k, v in bf16_case.items()}
    exact_out, exact_grads = _plain(upcast, torch.float64, **options)
    bf16_logits_out, bf16_logits_grads = _plain(bf16_case, torch.bfloat16, **options)
    assert all(g.dtype == torch.bfloat16 for g in fused_grads)
    fused_error = max(_relative(a, b) for a, b in zip(fused_grads, exact_grads))
    plain_bf16_error = max(_relative(a, b) for a, b in zip(bf16_logits_grads, exact_grads))
    assert fused_error < 2e-2
    assert fused_error < plain_bf16_error / 2
    assert float(fused_out["loss"].detach()) == pytest.approx(float(exact_out["loss"].detach()), rel=1e-4)



@pytest.fixture
def _one_thread(monkeypatch):
    """Dispatch modes are per thread: keep the whole computation on this one."""
    monkeypatch.setattr(fused_threads, "EAGER_BLOCK_ELEMENTS", DEFAULT_BLOCK_ELEMENTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_no_tokens_by_vocab_tensor_is_ever_created(_one_thread):
    rows, width, vocab, chunk = 4096, 32, 8192, 256
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    teacher = {
        "teacher_hidden": torch.randn(rows, width, generator=gen),
        "teacher_head_weight": torch.randn(vocab, width, generator=gen),
    }
    with largest_tensor_recorder() as recorder:
        out = fused_distillation_loss(
            hidden, weight, None, labels, None, **teacher, objective="jsd", alpha=0.5, chunk_size=chunk
        )
        out["loss"].backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert recorder.largest < rows * vocab
    assert recorder.largest <= chunk * vocab
    # The recorder does see full logits when they exist (the plain path).
    with largest_tensor_recorder() as recorder:
        (hidden[:512] @ weight.T).sum().backward()
    assert recorder.largest >= 512 * vocab


def test_compiled_path_traces_and_matches(monkeypatch):
    # aot_eager checks dynamo tracing of the block math in seconds; the benchmark runs inductor.
    monkeypatch.setattr(fused_kernels, "COMPILE_BACKEND", "aot_eager")
    # Blocks of 5 rows in chunks of 16: three compiled blocks and an eager remainder of 1.
    monkeypatch.setattr(fused, "COMPILED_BLOCK_ELEMENTS", 5 * VOCAB)
    case = _case(seed=12)
    options = {"objective": "skew_reverse_kl", "alpha": 0.5, "top_k": 9, "chunk_size": 16, "compile": True}
    _assert_close(_fused(case, torch.float64, **options), _plain(case, torch.float64, **options), 1e-10, 1e-10)


def test_backward_scales_by_grad_output_once_and_teacher_gets_no_gradient():
    case = _case(seed=13)
    teacher_hidden = case["teacher_hidden"].clone().requires_grad_()

    def run():
        leaves = _leaves(case, torch.float64)
        out = fused_distillation_loss(
            *leaves, case["labels"], None,
            teacher_hidden=teacher_hidden, teacher_head_weight=case["teacher_weight"], objective="jsd",
        )
        return out, leaves

    scaled, scaled_leaves = run()
    (3.0 * scaled["loss"]).backward(retain_graph=True)
    once, once_leaves = run()
    once["loss"].backward()
    for three_times, single in zip(scaled_leaves, once_leaves):
        assert torch.allclose(three_times.grad, 3.0 * single.grad, rtol=1e-12, atol=0)
    assert teacher_hidden.grad is None
    assert not scaled["kd"].requires_grad and not scaled["ce"].requires_grad
    with pytest.raises(RuntimeError, match="already used"):
        scaled["loss"].backward()


def test_frozen_head_still_gives_the_hidden_gradient_and_no_grad_gives_values_only():
    case = _case(seed=14)
    hidden = case["hidden"].clone().requires_grad_()
    teacher = {"teacher_logits": _teacher_logits(case)}
    out = fused_distillation_loss(hidden, case["weight"], case["bias"], case["labels"], None, **teacher)
    out["loss"].backward()
    full_out, full_grads = _fused(case, torch.float64, teacher="logits")
    assert torch.allclose(hidden.grad, full_grads[0], rtol=1e-12)
    with torch.no_grad():
        evaluated = fused_distillation_loss(
            case["hidden"], case["weight"], case["bias"], case["labels"], None, **teacher
        )
    assert not evaluated["loss"].requires_grad
    assert float(evaluated["loss"]) == pytest.approx(float(full_out["loss"].detach()), rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "error", "text"),
    [
        ({"objective": "kl"}, ConfigError, "unknown objective"),
        ({"reduction": "avg"}, ConfigError, "reduction"),
        ({"chunk_size": 0}, ConfigError, "chunk_size"),
        ({"temperature": 0.0}, ConfigError, "temperature"),
        ({"teacher_logits": torch.zeros(ROWS, VOCAB + 1, dtype=torch.float64)}, ModelError, "65"),
        ({"labels": torch.full((ROWS,), VOCAB)}, DataError, "outside"),
        ({"mask": torch.ones(ROWS + 1, dtype=torch.bool)}, DataError, "mask"),
        ({"teacher_hidden": torch.zeros(ROWS, 3, dtype=torch.float64)}, ConfigError, "teacher_logits and a teacher"),
    ],
)
def test_bad_arguments_raise_alambic_errors(overrides, error, text):
    case = _case()
    kwargs = {"teacher_logits": _teacher_logits(case), "alpha": 0.5}
    labels, mask = overrides.pop("labels", case["labels"]), overrides.pop("mask", None)
    if "teacher_hidden" in overrides:
        overrides["teacher_head_weight"] = torch.zeros(VOCAB, 3, dtype=torch.float64)
    kwargs.update(overrides)
    with pytest.raises(error, match=text) as caught:
        fused_distillation_loss(case["hidden"], case["weight"], None, labels, mask, **kwargs)
    assert caught.value.message
