"""Soft targets from generated data: the teacher's per-token logprobs stored in a record.

`alambic generate` keeps, for answer records, the server's `completion_logprobs`:
one {token, logprob, top: [{token, logprob}, ...]} per completion token (local
backends add `token_id`). Learning from them needs the teacher's tokens to be
the student's tokens, so the completion ids are built from the API tokens
themselves: each sampled token must be exactly one student token, and the ids
must spell the completion. A record where that fails is trained on its text
with hard targets only, and counted. Alternatives that are not one student
token are dropped; their probability stays in the tail (1 - sum of the kept).

A row gets `topk_ids` / `topk_logprobs`, one list per input position: the
entry at position t is the teacher distribution that predicts token t + 1
(empty where there is none).

    alambic distill configs/distill_generated_soft.yaml
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass, field

import torch

from alambic.errors import DataError

SOFT, ABSENT, FALLBACK = "soft", "absent", "fallback"

_MAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TokenMapper:
    """Teacher token (as the server wrote it) -> the one student id it is, or None. Cached per text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._ids: dict[str, int | None] = {}

    def id_of(self, entry: dict) -> int | None:
        text, token_id = entry.get("token"), entry.get("token_id")
        if not isinstance(text, str) or not text:
            return None
        # A local backend with this very vocabulary writes raw vocabulary strings ("Ġword") and their ids.
        if isinstance(token_id, int) and 0 <= token_id < self.vocab_size:
            if self.tokenizer.convert_ids_to_tokens(token_id) == text:
                return token_id
        if text not in self._ids:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._ids[text] = ids[0] if len(ids) == 1 else None
        return self._ids[text]


def token_mapper(tokenizer) -> TokenMapper:
    mapper = _MAPPERS.get(tokenizer)
    if mapper is None:
        mapper = _MAPPERS[tokenizer] = TokenMapper(tokenizer)
    return mapper


@dataclass
class SoftTargets:
    """One record's completion as teacher tokens, with the teacher's distribution at each."""

    status: str  # SOFT, ABSENT, or "fallback: why"
    completion_ids: list[int] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)
    ends_with_eos: bool = False

    @property
    def usable(self) -> bool:
        return self.status == SOFT

    def attach(self, row: dict, prompt_length: int) -> dict:
        """Add the per-position lists to an encoded row (and the status, popped when counting)."""
        row["soft_targets"] = self.status
        if not self.usable:
            return row
        length = len(row["input_ids"])
        ids: list[list[int]] = [[] for _ in range(length)]
        logprobs: list[list[float]] = [[] for _ in range(length)]
        for token_index, (alternatives, values) in enumerate(zip(self.topk_ids, self.topk_logprobs)):
            position = prompt_length + token_index - 1  # the position whose next token this one is
            if 0 <= position < length:
                ids[position], logprobs[position] = alternatives, values
        row["topk_ids"], row["topk_logprobs"] = ids, logprobs
        return row


def _logprob(entry) -> float | None:
    value = entry.get("logprob") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(float(value), 0.0)


def _distribution(entry: dict, chosen_id: int, mapper: TokenMapper) -> tuple[list[int], list[float]]:
    """The teacher's alternatives that are single student tokens, plus the sampled one."""
    ids: list[int] = []
    logprobs: list[float] = []
    for alternative in entry.get("top") or []:
        alternative_id = mapper.id_of(alternative) if isinstance(alternative, dict) else None
        value = _logprob(alternative)
        if alternative_id is None or value is None or alternative_id in ids:
            continue  # its mass stays in the tail
        ids.append(alternative_id)
        logprobs.append(value)
    chosen = _logprob(entry)
    # A sampled token outside the top list still has a known probability: keep it.
    if chosen_id not in ids and chosen is not None:
        ids.append(chosen_id)
        logprobs.append(chosen)
    total = sum(math.exp(value) for value in logprobs)
    if total > 1.0:  # the server's rounding; the tail is then empty
        shift = math.log(total)
        logprobs = [value - shift for value in logprobs]
    return ids, logprobs


def soft_targets_for(record: dict, column: str, completion: str, tokenizer, where: str) -> SoftTargets:
    """The record's soft targets, or why it falls back to hard targets (`where` names the record)."""
    entries = record.get(column)
    if entries is None:
        return SoftTargets(ABSENT)
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise DataError(
            f"{where}: column {column!r} must be a list of {{token, logprob, top}} objects, "
            f"got {type(entries).__name__}",
            "point data.logprobs_column at the completion_logprobs written by alambic generate",
        )
    if not entries:
        return SoftTargets(f"{FALLBACK}: {where}: no teacher tokens")
    mapper = token_mapper(tokenizer)
    soft = SoftTargets(SOFT)
    for token_index, entry in enumerate(entries):
        token_id = mapper.id_of(entry)
        if token_id is None:
            return SoftTargets(f"{FALLBACK}: {where}: teacher token {token_index} ({entry.get('token')!r}) "
                               "is not exactly one student token")
        soft.completion_ids.append(token_id)
        alternatives, values = _distribution(entry, token_id, mapper)
        soft.topk_ids.append(alternatives)
        soft.topk_logprobs.append(values)
    if tokenizer.decode(soft.completion_ids, skip_special_tokens=True).strip() != completion.strip():
        return SoftTargets(f"{FALLBACK}: {where}: the teacher tokens do not spell the completion")
    soft.ends_with_eos = soft.completion_ids[-1] == tokenizer.eos_token_id
    return soft


def report_soft_targets(statuses: list[str], source: str, column: str) -> dict:
    """Count records by outcome and say once how many lost their soft targets; returns the counts."""
    fallbacks = [status for status in statuses if status.startswith(FALLBACK)]
    counts = {SOFT: statuses.count(SOFT), ABSENT: statuses.count(ABSENT), FALLBACK: len(fallbacks)}
    if fallbacks:
        print(f"warning: {source}: {len(fallbacks)} of {len(statuses)} records fell back to hard targets "
              f"(no soft targets from {column!r}); first: {fallbacks[0].split(': ', 1)[1]}", file=sys.stderr)
    if counts[ABSENT]:
        print(f"warning: {source}: {counts[ABSENT]} of {len(statuses)} records have no {column!r}; "
              "they train on hard targets", file=sys.stderr)
    return counts


def collate_soft_targets(rows: list[dict], length: int) -> dict:
    """[B, L, k] teacher ids (-1 pads positions with fewer than k) and logprobs; k = the batch's widest position."""
    width = max((len(alternatives) for row in rows for alternatives in row.get("topk_ids", ())), default=0) or 1
    ids, logprobs = [], []
    for row in rows:
        row_ids, row_logprobs = row.get("topk_ids", []), row.get("topk_logprobs", [])
        padding = length - len(row_ids)
        ids.append([a + [-1] * (width - len(a)) for a in row_ids] + [[-1] * width] * padding)
        logprobs.append([v + [0.0] * (width - len(v)) for v in row_logprobs] + [[0.0] * width] * padding)
    return {"topk_ids": torch.tensor(ids, dtype=torch.long),
            "topk_logprobs": torch.tensor(logprobs, dtype=torch.float32)}
