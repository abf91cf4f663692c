"""Run models over evaluation data: class logits for classifiers, log-likelihood sums for causal LMs.

Held-out text for causal LMs is cut into non-overlapping windows; every token
after the first of a document is scored once, and the bytes those tokens cover
are counted, so bits per byte compare models with different tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from alambic.errors import DataError
from alambic.evaluate.metrics import kl_and_top1_agreement, token_nll_sum

IGNORE = -100


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not enabled,
    )


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def classifier_logits(
    model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32, description: str = "predict",
    show_progress: bool = True,
) -> torch.Tensor:
    """(N, classes) logits in fp32, in the order of `texts`."""
    if not texts:
        raise DataError("the evaluation set is empty", "give a file with at least one labelled example")
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    with progress_bar(show_progress) as bar:
        task = bar.add_task(description, total=len(texts))
        for chunk in _batches(texts, batch_size):
            encoded = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            chunks.append(model(**encoded.to(device)).logits.float().cpu())
            bar.advance(task, len(chunk))
    return torch.cat(chunks)


@dataclass
class ScoredWindows:
    """Token windows of held-out documents, ready to batch."""

    inputs: list[list[int]]
    targets: list[list[int]]
    total_bytes: int


def lm_windows(tokenizer, texts: list[str], max_length: int) -> ScoredWindows:
    """Non-overlapping windows; a document starts from BOS when the tokenizer has one."""
    inputs, targets, total_bytes = [], [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
            scored_bytes = len(text.encode("utf-8"))
        else:  # the first token has no context: it is not scored, nor are its bytes
            scored_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
        if len(ids) < 2:
            continue
        total_bytes += scored_bytes
        for start in range(0, len(ids) - 1, max_length):
            window = ids[start : start + max_length + 1]
            inputs.append(window[:-1])
            targets.append(window[1:])
    if not inputs:
        raise DataError("the held-out text is empty: no token to score", "give held-out documents with some text")
    return ScoredWindows(inputs, targets, total_bytes)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.inference_mode()
def causal_lm_scores(
    model, windows: ScoredWindows, teacher=None, batch_size: int = 8, description: str = "score",
    show_progress: bool = True,
) -> dict[str, float]:
    """Sums over all scored positions: nll (nats), tokens, bytes; with a teacher also KL and top-1 matches."""
    model.eval()
    device = next(model.parameters()).device
    totals = {"nll": 0.0, "tokens": 0, "bytes": windows.total_bytes, "kl": 0.0, "top1": 0.0}
    pairs = list(zip(windows.inputs, windows.targets))
    with progress_bar(show_progress) as bar:
        task = bar.add_task(description, total=len(pairs))
        for chunk in _batches(pairs, batch_size):
            input_ids = _pad([p[0] for p in chunk], 0).to(device)
            targets = _pad([p[1] for p in chunk], IGNORE).to(device)
            attention_mask = (targets != IGNORE).long()
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            vocab = logits.shape[-1]
            nll, count = token_nll_sum(logits, targets)
            totals["nll"] += nll
            totals["tokens"] += count
            if teacher is not None:
                teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                shared = min(vocab, teacher_logits.shape[-1])  # padded embedding rows are not tokens
                kl, top1, _ = kl_and_top1_agreement(logits[..., :shared], teacher_logits[..., :shared], targets != IGNORE)
                totals["kl"] += kl
                totals["top1"] += top1
            bar.advance(task, len(chunk))
    return totals
