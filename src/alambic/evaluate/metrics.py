"""Quality metrics as pure functions of predictions, probabilities and log-likelihoods.

Classifiers: accuracy, macro-F1, agreement between two models, expected
calibration error (ECE) and the confusion matrix. Causal LMs: perplexity, bits
per byte (the tokenizer-independent form of the log-likelihood, so models with
different vocabularies can be compared), teacher-student KL and top-1
agreement. Retention compares a student's metric with the teacher's.

    python -c "from alambic.evaluate.metrics import bits_per_byte; import math; print(bits_per_byte(math.log(256) * 10, 10))"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alambic.errors import DataError

# Metrics where a lower value is better: retention is then teacher / student.
LOWER_IS_BETTER = frozenset(
    {"ece", "perplexity", "bits_per_byte", "latency_ms", "peak_memory_mb", "num_parameters", "disk_mb",
     "ttft_ms_batch1", "ttft_ms_batch8", "kl_to_teacher"}
)

# Counts and measurement spreads that describe the evaluation, not the model: no retention.
NOT_COMPARED = frozenset({"eval_tokens", "num_examples", "throughput_spread", "throughput_rounds", "speed_rounds",
                          "tokens_per_s_spread_batch1", "tokens_per_s_spread_batch8"})


def _as_long_tensor(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


def _require_same_length(first: torch.Tensor, second: torch.Tensor, what: str) -> None:
    if first.numel() == 0:
        raise DataError(f"cannot compute {what} on an empty evaluation set", "give at least one example")
    if first.numel() != second.numel():
        raise ValueError(f"{what}: {first.numel()} predictions but {second.numel()} references")


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    predictions, labels = _as_long_tensor(predictions), _as_long_tensor(labels)
    _require_same_length(predictions, labels, "accuracy")
    return (predictions == labels).float().mean().item()


def agreement(predictions: Sequence[int] | torch.Tensor, reference: Sequence[int] | torch.Tensor) -> float:
    """Fraction of examples where two models predict the same class (or token)."""
    predictions, reference = _as_long_tensor(predictions), _as_long_tensor(reference)
    _require_same_length(predictions, reference, "agreement")
    return (predictions == reference).float().mean().item()


def confusion_matrix(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor, num_classes: int
) -> list[list[int]]:
    """counts[true][predicted]."""
    predictions, labels = _as_long_tensor(predictions), _as_long_tensor(labels)
    _require_same_length(predictions, labels, "confusion matrix")
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).tolist()


def macro_f1(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Unweighted mean of per-class F1 over every class seen in labels or predictions.

    A class with no true positive scores 0 (scikit-learn's zero_division=0), so
    a model that never predicts a class is penalised for it.
    """
    predictions, labels = _as_long_tensor(predictions), _as_long_tensor(labels)
    _require_same_length(predictions, labels, "macro-F1")
    scores = []
    for cls in torch.unique(torch.cat([predictions, labels])).tolist():
        true_positive = ((predictions == cls) & (labels == cls)).sum().item()
        predicted = (predictions == cls).sum().item()
        actual = (labels == cls).sum().item()
        scores.append(2.0 * true_positive / (predicted + actual) if true_positive else 0.0)
    return sum(scores) / len(scores)


def expected_calibration_error(
    probabilities: torch.Tensor, labels: Sequence[int] | torch.Tensor, num_bins: int = 15
) -> float:
    """ECE (Guo et al., 2017): sum over confidence bins of |accuracy - confidence| weighted by bin size.

    Bins are equal-width on the top-class probability, right-closed: (0, 1/B], ..., ((B-1)/B, 1].
    """
    labels = _as_long_tensor(labels)
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    _require_same_length(probabilities[:, 0] if probabilities.numel() else probabilities, labels, "ECE")
    confidence, predicted = probabilities.max(dim=-1)
    correct = (predicted == labels).double()
    bin_index = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    total = torch.zeros(()).double()
    for index in range(num_bins):
        in_bin = bin_index == index
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            total += gap * in_bin.double().mean()
    return total.item()


# ----------------------------------------------------------------------------- language models


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the targets and how many targets counted."""
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    return nll.item(), int((flat_targets != ignore_index).sum().item())


def perplexity(total_nll_nats: float, total_tokens: int) -> float:
    if total_tokens <= 0:
        raise DataError("cannot compute perplexity: the evaluation text has no scored token", "give non-empty text")
    return math.exp(total_nll_nats / total_tokens)


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """Log-loss per UTF-8 byte of the scored text, in bits: comparable across tokenizers."""
    if total_bytes <= 0:
        raise DataError("cannot compute bits per byte: the evaluation text is empty", "give non-empty text")
    return total_nll_nats / (math.log(2.0) * total_bytes)


def kl_and_top1_agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, float, int]:
    """Summed KL(teacher || student) in nats, summed top-1 matches, and positions counted."""
    student_logprobs = F.log_softmax(student_logits.float(), dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
    matches = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
    if mask is None:
        mask = torch.ones_like(kl, dtype=torch.bool)
    mask = mask.bool()
    return kl[mask].sum().item(), matches[mask].sum().item(), int(mask.sum().item())


# ----------------------------------------------------------------------------- comparisons


def retention(student_value: float | None, teacher_value: float | None, metric: str) -> float | None:
    """How much of the teacher's quality (or speed) the student keeps; > 1 means better than the teacher.

    For lower-is-better metrics the ratio is inverted, so 2.0 always means "twice as good".
    """
    if student_value is None or teacher_value is None:
        return None
    if metric in LOWER_IS_BETTER:
        return teacher_value / student_value if student_value else None
    return student_value / teacher_value if teacher_value else None


def gap_closed(kd_value: float, baseline_value: float, teacher_value: float) -> float | None:
    """Fraction of the baseline-to-teacher gap that distillation closes (1 = matches the teacher)."""
    gap = baseline_value - teacher_value
    if gap == 0:
        return None
    return (baseline_value - kd_value) / gap
