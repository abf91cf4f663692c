"""Transfer sets: unlabelled rows learn the teacher term alone; teacher hard labels are its argmax."""

from __future__ import annotations

import json

import pytest
import torch

from alambic.config import LossConfig
from alambic.data.transfer import IGNORE
from alambic.losses import per_token_distillation_loss, token_cross_entropy, token_divergence
from alambic.losses.targets import hard_target_loss, sparse_hard_labels, teacher_hard_labels, without_gold
from alambic.teachers.base import TeacherSignal
from alambic.training.step_loss import causal_lm_loss_sums, classification_loss_sums


class _Classifier(torch.nn.Module):
    def __init__(self, vocab=11, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, classes)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        logits = self.embed(input_ids).mean(1) if input_ids.dim() == 2 and position_ids is None else None
        return {"logits": logits}


class _Teacher:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, batch, request):
        return TeacherSignal(logits=self.logits)


def _grad(model, loss):
    model.zero_grad()
    loss.backward()
    return model.embed.weight.grad.clone()


def test_unlabelled_rows_train_on_the_soft_term_only():
    """alpha > 0: a row without a label gets exactly the gradient of (T^2) KL alone; a labelled row the mix."""
    model = _Classifier()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    batch_labels = torch.tensor([2, IGNORE])
    teacher_logits = torch.tensor([[0.5, -1.0, 2.0, 0.1], [1.5, 0.2, -0.3, 0.9]])
    loss_cfg = LossConfig(alpha=0.7, temperature=2.0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": batch_labels}
    sums = classification_loss_sums(model, batch, _Teacher(teacher_logits), loss_cfg)[0]
    got = _grad(model, sums["loss"])

    logits = model(ids)["logits"]
    kd = token_divergence(logits, teacher_logits, "forward_kl", 2.0)
    ce0 = token_cross_entropy(logits[:1], batch_labels[:1])
    expected_loss = 0.7 * ce0[0] + 0.3 * kd[0] + kd[1]
    expected = _grad(model, expected_loss)
    assert torch.allclose(got, expected, atol=1e-6)
    assert float(sums["ce"].detach()) == pytest.approx(float(ce0[0].detach()), rel=1e-5)  # the unlabelled row adds no CE

    # The unlabelled row alone: its gradient is the KD gradient, whatever alpha is.
    only = {"input_ids": ids[1:], "attention_mask": torch.ones_like(ids[1:]), "labels": batch_labels[1:]}
    for alpha in (0.2, 0.9):
        sums = classification_loss_sums(model, dict(only), _Teacher(teacher_logits[1:]), LossConfig(alpha=alpha, temperature=2.0))[0]
        kd_only = token_divergence(model(ids[1:])["logits"], teacher_logits[1:], "forward_kl", 2.0).sum()
        assert torch.allclose(_grad(model, sums["loss"]), _grad(model, kd_only), atol=1e-6)


def test_without_a_teacher_unlabelled_rows_carry_no_loss():
    model = _Classifier()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, IGNORE])}
    sums = classification_loss_sums(model, batch, None, LossConfig(alpha=0.5))[0]
    expected = token_cross_entropy(model(ids[:1])["logits"], torch.tensor([1]))[0]
    assert float(sums["loss"].detach()) == pytest.approx(float(expected.detach()))


def test_hard_targets_are_the_teachers_argmax():
    teacher_logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 1.9, 0.0], [-5.0, -4.0, -3.0]])
    assert teacher_hard_labels(teacher_logits).tolist() == [1, 0, 2]
    student_logits = torch.randn(3, 3, requires_grad=True)
    terms = hard_target_loss(student_logits, None, teacher_hard_labels(teacher_logits), alpha=0.0)
    assert torch.allclose(terms["kd"], token_cross_entropy(student_logits, torch.tensor([1, 0, 2])))
    # A sparse (top-k) teacher: the argmax is the id with the highest stored log-probability.
    ids = torch.tensor([[7, 3, 9], [4, 8, 1]])
    logprobs = torch.tensor([[-2.0, -0.1, -3.0], [-0.5, -0.9, -4.0]])
    assert sparse_hard_labels(ids, logprobs).tolist() == [3, 4]


def test_hard_target_runs_train_on_the_argmax_through_the_objective():
    model = _Classifier()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    teacher_logits = torch.tensor([[0.5, -1.0, 2.0, 0.1], [1.5, 0.2, -0.3, 0.9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([IGNORE, IGNORE])}
    sums = classification_loss_sums(model, batch, _Teacher(teacher_logits), LossConfig(alpha=0.5, teacher_targets="hard"))[0]
    expected = token_cross_entropy(model(ids)["logits"], torch.tensor([2, 0])).sum()
    assert float(sums["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_without_gold_keeps_labelled_positions_and_drops_their_ce_elsewhere():
    terms = {"loss": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "kd": torch.tensor([[0.5, 0.5], [0.25, 0.25]]),
             "ce": torch.tensor([[9.0, 9.0], [9.0, 9.0]])}
    out = without_gold(terms, torch.tensor([True, False]))
    assert out["loss"].tolist() == [[1.0, 2.0], [0.25, 0.25]]
    assert out["ce"].tolist() == [[9.0, 9.0], [0.0, 0.0]]


class _LM(torch.nn.Module):
    def __init__(self, vocab=13):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, hidden_only=False, **_):
        return {"logits": self.embed(input_ids)}


def test_causal_lm_unlabelled_rows_learn_the_teacher_alone():
    model = _LM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    teacher_logits = torch.randn(2, 4, 13)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "has_label": torch.tensor([True, False])}
    loss_cfg = LossConfig(alpha=0.5, fused=False)
    sums = causal_lm_loss_sums(model, batch, _Teacher(teacher_logits), loss_cfg, fused=False)[0]
    logits = model(ids)["logits"][:, :-1]
    per = per_token_distillation_loss(logits, teacher_logits[:, :-1], ids[:, 1:], alpha=0.5)
    expected = per["loss"][0].sum() + per["kd"][1].sum()
    assert float(sums["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(sums["ce"].detach()) == pytest.approx(float(per["ce"][0].sum().detach()), rel=1e-5)


def test_labelled_and_unlabelled_pools_mix_in_one_training_set(tmp_path):
    from alambic.config import DataConfig
    from alambic.data import build_datasets
    from alambic.data.transfer import drop_unlabelled_without_teacher, pool_counts
    from alambic.data.stdlib_corpus import build_tokenizer

    tokenizer = build_tokenizer(["a b c d e t 0 1 2 3 4"] * 4, 300)
    labelled = tmp_path / "gold.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a b", "label": 1}, {"text": "c", "label": None},
                                                              {"text": "d e", "label": 0}]))
    unlabelled = tmp_path / "transfer.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": f"t {i}", "label": 1}) + "\n" for i in range(5)))
    cfg = DataConfig(train=str(labelled), unlabelled=str(unlabelled), format="classification", labelled_repeat=3,
                     max_length=16)
    train, _ = build_datasets(cfg, tokenizer, "sequence_classification")
    assert len(train) == 3 * 3 + 5
    assert pool_counts(train.rows) == {"labelled": 6, "unlabelled": 8}  # a null label and the whole second pool
    assert all(row["label"] == IGNORE for row in train.rows[-5:])  # labels in the unlabelled file are not gold
    dropped = drop_unlabelled_without_teacher(train, None, announce=lambda _: None)
    assert pool_counts(dropped.rows) == {"labelled": 6, "unlabelled": 0}
