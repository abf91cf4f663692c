"""Evaluation metrics on hand-made cases whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score

from alambic.errors import DataError
from alambic.evaluate import metrics as m
from alambic.evaluate.predict import causal_lm_scores, lm_windows
from alambic.evaluate.speed import count_parameters, peak_inference_memory_bytes, weights_bytes


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255), optional BOS id 256."""

    def __init__(self, with_bos: bool):
        self.bos_token_id = 256 if with_bos else None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FixedDistributionLM(torch.nn.Module):
    """Predicts the same next-token distribution everywhere, whatever the context."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.fixed = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None):
        batch, length = input_ids.shape
        return type("Out", (), {"logits": self.fixed.expand(batch, length, -1)})()


def test_uniform_over_256_bytes_is_8_bits_per_byte():
    targets = torch.randint(0, 256, (3, 50))
    nll, count = m.token_nll_sum(torch.zeros(3, 50, 256), targets)
    assert count == 150
    assert m.bits_per_byte(nll, 150) == pytest.approx(8.0)
    assert m.perplexity(nll, count) == pytest.approx(256.0)


def test_bits_per_byte_of_a_known_dyadic_distribution():
    # p = (1/2, 1/4, 1/8, 1/8): the tokens cost 1, 2, 3, 3 bits.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    nll, _ = m.token_nll_sum(logits.expand(4, 4), torch.tensor([0, 1, 2, 3]))
    assert m.bits_per_byte(nll, 4) == pytest.approx(9 / 4)
    # The same tokens covering two bytes each: half the bits per byte.
    assert m.bits_per_byte(nll, 8) == pytest.approx(9 / 8)


@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize("window", [7, 64])
def test_held_out_scoring_counts_every_byte_once_whatever_the_window(with_bos, window):
    texts = ["def f(x):\n    return x + 1\n", "import os  # é"]
    tokenizer = ByteTokenizer(with_bos)
    model = FixedDistributionLM(torch.zeros(257))
    windows = lm_windows(tokenizer, texts, window)
    scores = causal_lm_scores(model, windows, show_progress=False)
    scored_bytes = sum(len(t.encode()) for t in texts) - (0 if with_bos else 2)
    assert scores["tokens"] == scored_bytes == scores["bytes"]
    # Uniform over 257 ids: log2(257) bits for every byte.
    assert m.bits_per_byte(scores["nll"], scores["bytes"]) == pytest.approx(math.log2(257))


def test_empty_held_out_text_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        lm_windows(ByteTokenizer(True), [""], 16)


def test_kl_and_top1_agreement():
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    kl, top1, count = m.kl_and_top1_agreement(teacher.clone(), teacher)
    assert kl == pytest.approx(0.0, abs=1e-6) and top1 == 2 and count == 2
    student = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]])
    kl, top1, _ = m.kl_and_top1_agreement(student, teacher)
    p = torch.softmax(teacher[0], -1)
    q = torch.softmax(student[0], -1)
    assert kl == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)
    assert top1 == 1


def test_agreement_and_accuracy():
    assert m.agreement([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    assert m.accuracy([1, 1, 1, 0], [1, 0, 1, 0]) == pytest.approx(0.75)


def test_expected_calibration_error_by_hand():
    probabilities = torch.tensor([
        [0.90, 0.05, 0.05],  # confident, right
        [0.90, 0.05, 0.05],  # confident, wrong
        [0.20, 0.60, 0.20],  # right
        [0.40, 0.35, 0.25],  # wrong
    ])
    labels = [0, 1, 1, 2]
    # bin (0.8, 0.9]: accuracy 0.5, confidence 0.9, weight 2/4 -> 0.2
    # bin (0.5, 0.6]: accuracy 1.0, confidence 0.6, weight 1/4 -> 0.1
    # bin (0.3, 0.4]: accuracy 0.0, confidence 0.4, weight 1/4 -> 0.1
    assert m.expected_calibration_error(probabilities, labels, num_bins=10) == pytest.approx(0.4)


def test_a_calibrated_model_has_zero_ece():
    probabilities = torch.tensor([[0.75, 0.25]] * 4)
    assert m.expected_calibration_error(probabilities, [0, 0, 0, 1]) == pytest.approx(0.0)


def test_macro_f1_and_confusion_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)
    predictions = torch.where(torch.rand(200, generator=generator) < 0.6, labels, torch.randint(0, 4, (200,), generator=generator))
    assert m.macro_f1(predictions, labels) == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert m.confusion_matrix(predictions, labels, 5) == sk_confusion(labels, predictions, labels=range(5)).tolist()
    # A class that is predicted but never true still counts (scikit-learn's default label set).
    assert m.macro_f1([0, 1, 2], [0, 1, 1]) == pytest.approx(f1_score([0, 1, 1], [0, 1, 2], average="macro"))


def test_empty_classification_set_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        m.accuracy([], [])


def test_retention_inverts_lower_is_better_metrics():
    assert m.retention(0.9, 1.0, "accuracy") == pytest.approx(0.9)
    assert m.retention(10.0, 40.0, "latency_ms") == pytest.approx(4.0)
    assert m.retention(300.0, 100.0, "throughput_per_s") == pytest.approx(3.0)
    assert m.retention(None, 1.0, "accuracy") is None
    assert m.gap_closed(kd_value=1.5, baseline_value=2.0, teacher_value=1.0) == pytest.approx(0.5)


def test_peak_inference_memory_counts_weights_and_live_activations():
    model = torch.nn.Sequential(torch.nn.Linear(100, 400), torch.nn.ReLU(), torch.nn.Linear(400, 10))
    inputs = torch.randn(64, 100)
    activation_bytes = 64 * 400 * 4  # the Linear output and the ReLU output are alive together
    peak = peak_inference_memory_bytes(model, lambda: model(inputs))
    assert peak == weights_bytes(model) + 2 * activation_bytes


def test_tied_parameters_count_once():
    embedding = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = embedding.weight
    assert count_parameters(torch.nn.ModuleList([embedding, head])) == 400
