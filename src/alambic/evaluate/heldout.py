"""Held-out metrics during training: CE, teacher–student KL, top-1 agreement.

Sums are taken over every held-out position that carries a label and divided
once at the end, so the figures do not depend on the eval batch size.
"""

from __future__ import annotations

import math

import torch

from alambic.data import IGNORE, collate
from alambic.losses import token_cross_entropy, token_divergence
from alambic.teachers.base import SignalRequest


def _positions(task: str, batch: dict, student_logits, teacher_logits):
    """Align logits with labels: next-token for causal LMs, one per row for classifiers."""
    if task == "sequence_classification":
        labels = batch["labels"]
        return student_logits, teacher_logits, labels, torch.ones_like(labels, dtype=torch.bool)
    labels = batch["labels"][:, 1:]
    student_logits = student_logits[:, :-1]
    teacher_logits = teacher_logits[:, :-1] if teacher_logits is not None else None
    return student_logits, teacher_logits, labels, labels != IGNORE


@torch.no_grad()
def evaluate(student, teacher, dataset, task: str, pad_token_id: int, batch_size: int, device, max_batches=None) -> dict:
    """{"eval_ce", "eval_ppl", "eval_kl", "eval_agreement", "eval_accuracy"} on `dataset`."""
    was_training = student.training
    student.eval()
    totals = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "correct": 0.0, "count": 0.0}
    starts = range(0, len(dataset), batch_size)
    if max_batches is not None:
        starts = list(starts)[:max_batches]
    for start in starts:
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices], pad_token_id, indices).items()}
        student_logits = student(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))["logits"]
        teacher_logits = None
        if teacher is not None:
            signal = teacher(batch, SignalRequest())
            if signal.topk_ids is None:
                teacher_logits = signal.full_logits()
        student_logits, teacher_logits, labels, mask = _positions(task, batch, student_logits, teacher_logits)
        totals["ce"] += token_cross_entropy(student_logits, labels)[mask].sum().item()
        predictions = student_logits.argmax(-1)
        totals["correct"] += (predictions == labels)[mask].sum().item()
        if teacher_logits is not None:
            totals["kl"] += token_divergence(student_logits, teacher_logits, "forward_kl")[mask].sum().item()
            totals["agree"] += (predictions == teacher_logits.argmax(-1))[mask].sum().item()
        totals["count"] += mask.sum().item()
    if was_training:
        student.train()
    count = max(totals["count"], 1.0)
    metrics = {
        "eval_ce": totals["ce"] / count,
        "eval_ppl": math.exp(min(totals["ce"] / count, 50.0)),
        "eval_accuracy": totals["correct"] / count,
    }
    if teacher is not None:
        metrics["eval_kl"] = totals["kl"] / count
        metrics["eval_agreement"] = totals["agree"] / count
    return metrics
