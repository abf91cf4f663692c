"""Logits as the model computes them: the fused loss reproduces each architecture's
transformation after its LM head (Gemma 2/3 soft-capping, Granite and Cohere scaling),
and `loss.logit_softcap` caps both distributions in the plain, fused and sparse paths.

Reference everywhere: the plain path on the model's own `forward().logits`, in float64.

    .venv/bin/pytest tests/unit/test_logit_transform.py -q
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from torch import nn

from alambic.errors import ModelError
from alambic.losses import per_token_distillation_loss
from alambic.losses.fused import fused_distillation_loss
from alambic.losses.logit_transform import LogitTransform, logit_transform_of, verify_logit_transform
from alambic.losses.sparse import fused_sparse_distillation_loss, sparse_per_token_distillation_loss
from alambic.models.module import StudentModule
from alambic.teachers.base import SignalRequest
from alambic.teachers.live import LiveTeacher

VOCAB = 96
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
}


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=16, final_logit_softcapping=0.7))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=16, final_logit_softcapping=0.5))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**COMMON, logits_scaling=4.0))


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**COMMON, logit_scale=0.0625))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**COMMON))


ARCHITECTURES = {"gemma2": _gemma2, "gemma3": _gemma3, "granite": _granite, "cohere": _cohere, "llama": _llama}
EXPECTED = {
    "gemma2": LogitTransform(1.0, (0.7,)), "gemma3": LogitTransform(1.0, (0.5,)),
    "granite": LogitTransform(0.25, ()), "cohere": LogitTransform(0.0625, ()), "llama": LogitTransform(),
}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().double().eval()
    with torch.no_grad():  # logits of several units, so that the caps and scales matter
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _batch(seed: int = 0, rows: int = 2, length: int = 7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


@contextmanager
def _plain_path_in_float64():
    """The plain path casts to fp32 with .float(); keep float64 inputs float64 for the reference."""
    original = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep_float64):
        yield


def _plain_on_forward_logits(student, teacher, ids, labels, **options):
    """Reference: the plain loss on both models' own forward().logits (float64), and its gradients."""
    student.zero_grad()
    logits = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1]
    shifted = labels[:, 1:]
    with _plain_path_in_float64():
        per_token = per_token_distillation_loss(logits, teacher_logits, shifted, **options)
    loss = torch.where(shifted != -100, per_token["loss"], 0.0).sum()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in student.parameters()]


def _fused_on_hidden(student, teacher, ids, labels, **options):
    """The training path: StudentModule + LiveTeacher signal + fused loss."""
    student.zero_grad()
    module = StudentModule(student)
    hidden = module(ids, hidden_only=True)["hidden"][:, :-1]
    signal = LiveTeacher(teacher)({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, SignalRequest(True))
    assert signal.hidden is not None, "the teacher's transformation is reproducible: no full logits needed"
    shifted = labels[:, 1:]
    mask = shifted != -100
    weight, bias = module.head_parameters()
    out = fused_distillation_loss(
        hidden[mask], weight, bias, shifted[mask], None, teacher_hidden=signal.hidden[:, :-1][mask],
        teacher_head_weight=signal.head_weight, teacher_head_bias=signal.head_bias,
        teacher_transform=signal.logit_transform, student_transform=module.logit_transform(), chunk_size=5,
        **options,
    )
    out["loss"].backward()
    return float(out["loss"].detach()), [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_transform_is_read_from_the_config_and_matches_forward(name):
    model = _model(name)
    assert logit_transform_of(model) == EXPECTED[name]
    verify_logit_transform(model, EXPECTED[name])  # forward().logits == transform(head(hidden))
    if name != "llama":
        with pytest.raises(ModelError, match="loss.fused=false"):
            verify_logit_transform(model, LogitTransform())  # forgetting the transformation is caught


@pytest.mark.parametrize("student_name", ["gemma2", "gemma3", "granite", "cohere"])
@pytest.mark.parametrize("objective", ["forward_kl", "jsd"])
def test_fused_loss_equals_plain_loss_on_the_models_own_logits(student_name, objective):
    teacher_name = {"gemma2": "cohere", "gemma3": "granite", "granite": "gemma2", "cohere": "gemma3"}[student_name]
    student, teacher = _model(student_name, seed=1), _model(teacher_name, seed=2)
    ids, labels = _batch()
    options = {"objective": objective, "alpha": 0.4, "temperature": 1.5}
    plain_loss, plain_grads = _plain_on_forward_logits(student, teacher, ids, labels, **options)
    fused_loss, fused_grads = _fused_on_hidden(student, teacher, ids, labels, **options)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-10)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-9, atol=1e-12)


def test_the_untransformed_head_would_give_a_different_loss():
    # Guards the test above: the transformations really change the loss here.
    student, teacher = _model("gemma2", seed=1), _model("cohere", seed=2)
    ids, labels = _batch()
    reference, _ = _plain_on_forward_logits(student, teacher, ids, labels, objective="jsd")
    module = StudentModule(student)
    module._logit_transform = LogitTransform()  # pretend there were no soft-capping
    hidden = module(ids, hidden_only=True)["hidden"][:, :-1].reshape(-1, 32)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    weight, _ = module.head_parameters()
    wrong = fused_distillation_loss(hidden, weight, None, labels[:, 1:].reshape(-1), None,
                                    teacher_logits=teacher_logits, objective="jsd")
    assert abs(float(wrong["loss"].detach()) - reference) > 1e-3 * abs(reference)


class _ShiftedHead(nn.Module):
    """A model whose forward() adds a constant after its head: not reproducible."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.base_model = inner, inner.config, inner.model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, use_cache=False, **kwargs):
        out = self.inner(input_ids=input_ids, use_cache=use_cache, **kwargs)
        out.logits = out.logits * 3.0 + 1.0
        return out


def test_unknown_transformation_refused_for_the_student_and_full_logits_for_the_teacher():
    odd = _ShiftedHead(_model("llama"))
    with pytest.raises(ModelError, match="does not reproduce"):
        StudentModule(odd).logit_transform()
    ids, _ = _batch()
    signal = LiveTeacher(odd)({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, SignalRequest(True))
    assert signal.hidden is None and signal.logits is not None
    torch.testing.assert_close(signal.full_logits(), odd(ids).logits)


def test_teacher_signal_full_logits_apply_the_transformation():
    teacher = _model("gemma2")
    ids, _ = _batch()
    signal = LiveTeacher(teacher)({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, SignalRequest(True))
    torch.testing.assert_close(signal.full_logits(), teacher(input_ids=ids).logits.float(), rtol=1e-6, atol=1e-6)


# ---- loss.logit_softcap: both distributions capped inside the loss ----------------------------


def _logits(seed, rows=9, vocab=VOCAB, scale=6.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale


def _capped(x, cap):
    return torch.tanh(x / cap) * cap


@pytest.mark.parametrize("objective", ["forward_kl", "jsd", "tvd", "cosine"])
def test_plain_logit_softcap_equals_the_loss_on_capped_logits(objective):
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    labels = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2))
    got = per_token_distillation_loss(student, teacher, labels, objective=objective, alpha=0.3, logit_softcap=2.0)
    want = per_token_distillation_loss(_capped(student, 2.0), _capped(teacher, 2.0), labels, objective=objective, alpha=0.3)
    torch.testing.assert_close(got["loss"].double(), want["loss"].double())
    uncapped = per_token_distillation_loss(student, teacher, labels, objective=objective, alpha=0.3)
    assert not torch.allclose(got["loss"], uncapped["loss"])


@pytest.mark.parametrize("teacher_kind", ["head", "logits"])
def test_fused_logit_softcap_equals_plain(teacher_kind):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64) * 2
    teacher_hidden = torch.randn(11, 12, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(VOCAB, 12, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (11,), generator=generator)
    options = {"objective": "jsd", "alpha": 0.5, "beta": 0.3, "logit_softcap": 3.0}
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _plain_path_in_float64():
        plain = per_token_distillation_loss(h1 @ w1.T, teacher_hidden @ teacher_weight.T, labels, **options)["loss"].sum()
    plain.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    teacher = ({"teacher_hidden": teacher_hidden, "teacher_head_weight": teacher_weight} if teacher_kind == "head"
               else {"teacher_logits": teacher_hidden @ teacher_weight.T})
    fused = fused_distillation_loss(h2, w2, None, labels, None, chunk_size=4, **teacher, **options)["loss"]
    fused.backward()
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-10)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-9, atol=1e-12)


def test_sparse_logit_softcap_caps_the_student_in_plain_and_fused_sparse_paths():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(10, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64) * 2
    teacher_lp = torch.randn(10, VOCAB, generator=generator, dtype=torch.float64).log_softmax(-1)
    top_lp, top_ids = teacher_lp.topk(6, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1))
    labels = torch.randint(0, VOCAB, (10,), generator=generator)
    options = {"objective": "forward_kl", "alpha": 0.5}
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = sparse_per_token_distillation_loss(h1 @ w1.T, top_ids, top_lp, tail, labels, logit_softcap=1.5, **options)
    want = sparse_per_token_distillation_loss(_capped(hidden @ weight.T, 1.5), top_ids, top_lp, tail, labels, **options)
    torch.testing.assert_close(plain["loss"], want["loss"].float())
    plain["loss"].sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = fused_sparse_distillation_loss(h2, w2, None, labels, None, topk_ids=top_ids, topk_logprobs=top_lp,
                                           tail_logmass=tail, logit_softcap=1.5, chunk_size=3, **options)["loss"]
    fused.backward()
    assert float(fused.detach()) == pytest.approx(float(plain["loss"].sum().detach()), rel=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)


def test_training_step_loss_fused_equals_plain_for_a_soft_capped_student_and_scaled_teacher():
    """Through the loop's own step loss (training/step_loss.py): loss.fused true vs false."""
    from alambic.config import LossConfig
    from alambic.training.step_loss import loss_sums

    ids, labels = _batch(seed=3)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fused in (True, False):
        student = StudentModule(_model("gemma2", seed=1).float().train())
        teacher = LiveTeacher(_model("granite", seed=2).float())
        config = LossConfig(objective="jsd", alpha=0.3, fused=fused, chunk_size=4, logit_softcap=5.0)
        sums = loss_sums(student, dict(batch), teacher, config, "causal_lm")
        sums["loss"].backward()
        results.append((float(sums["loss"].detach()), [p.grad.clone() for p in student.parameters()]))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-6)
