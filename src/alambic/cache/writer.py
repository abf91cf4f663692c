"""Run a teacher once over a dataset and store its top-k distributions, shard by shard.

Each shard (a run of `shard_rows` dataset rows) is computed in memory, written
to a temporary file, fsynced and renamed; only then is it added, with its
sha256, to the manifest, which is itself replaced atomically. A run killed at
any moment therefore leaves a manifest listing only complete, checksummed
shards, and `resume=True` carries on from the first shard it does not list.

    alambic cache-logits configs/tiny_kd.yaml --k 64 --out runs/cache --resume
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from alambic.cache.format import MANIFEST_NAME, encode_records, sha256_file, shard_name, write_manifest, write_shard
from alambic.cache.identity import CacheIdentity, identity_differences
from alambic.durable import TEMPORARY_GLOB
from alambic.errors import DataError

# Positions whose top-k is computed at once: bounds the fp32 [tokens, V] work tensors.
TOKENS_PER_TOPK_CHUNK = 4096
CacheLogitsFn = Callable[[dict], torch.Tensor]


def topk_signal(
    logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V] logits -> (top-k ids [N, k], their log-probs at `temperature` [N, k], log tail mass [N])."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    # The complement's log-sum-exp, not log(1 - sum top-k), keeps tiny tails accurate.
    tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(dim=-1)
    return top_ids, top_logprobs, tail


def pad_rows(rows: list[dict], pad_token_id: int) -> dict:
    """Right-padded input_ids / attention_mask (and position_ids for packed rows)."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"], dtype=torch.long)
        attention_mask[i, : len(row["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in rows[0]:
        positions = torch.arange(length).repeat(len(rows), 1)
        for i, row in enumerate(rows):
            positions[i, : len(row["position_ids"])] = torch.tensor(row["position_ids"], dtype=torch.long)
        batch["position_ids"] = positions
    return batch


def _refuse_foreign_folder(folder: Path) -> None:
    from alambic.folder_lock import RUN_LOCK_NAME

    occupied = folder.exists() and any(entry.name != RUN_LOCK_NAME for entry in folder.iterdir())
    if occupied and not (folder / MANIFEST_NAME).exists():  # a run's lock alone does not make it foreign
        raise DataError(
            f"{folder} is not empty and is not a logit cache (no {MANIFEST_NAME})",
            "choose an empty or new folder for --out",
        )


def _remove_cache_files(folder: Path) -> None:
    for path in list(folder.glob("shard-*.bin")) + list(folder.glob(TEMPORARY_GLOB)) + [folder / MANIFEST_NAME]:
        path.unlink(missing_ok=True)


def _check_resumable(folder: Path, identity: CacheIdentity, keys: tuple[str, ...] | None = None) -> dict:
    """The folder's manifest, if its identity equals `identity` (on `keys`); else a DataError listing the differences."""
    from alambic.cache.reader import read_manifest  # the reader owns manifest validation

    manifest = read_manifest(folder)
    differences = identity_differences(CacheIdentity.from_manifest(manifest, str(folder)), identity, keys)
    if differences:
        raise DataError(
            f"cannot resume the logit cache in {folder}: it was made with different settings:\n  - "
            + "\n  - ".join(differences),
            "run with the cache's settings, or start a new cache (--overwrite, or another --out folder)",
        )
    return manifest


def _refuse_existing(folder: Path) -> None:
    done = json.loads((folder / MANIFEST_NAME).read_text()).get("shards", [])
    raise DataError(
        f"{folder} already holds a logit cache ({len(done)} shards written)",
        "pass --resume to continue it, --overwrite to start again, or choose another --out folder",
    )


def check_folder_before_teacher(folder: str | Path, identity: CacheIdentity, resume: bool, overwrite: bool) -> None:
    """The refusals that need no teacher weights, raised before a large teacher is loaded.

    `identity.teacher_weight_hash` is ignored here; `prepare_folder` checks it.
    """
    folder = Path(folder)
    _refuse_foreign_folder(folder)
    if overwrite or not (folder / MANIFEST_NAME).exists():
        return
    if not resume:
        _refuse_existing(folder)
    _check_resumable(folder, identity, tuple(f.name for f in fields(CacheIdentity) if f.name != "teacher_weight_hash"))


def _load_for_resume(folder: Path, identity: CacheIdentity) -> dict:
    manifest = _check_resumable(folder, identity)
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.exists() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise DataError(
                f"cannot resume the logit cache in {folder}: finished shard {entry['file']} is missing or "
                "corrupted (checksum mismatch)",
                "start the cache again with --overwrite (the disk or another process changed the file)",
            )
    listed = {entry["file"] for entry in manifest["shards"]}
    for path in list(folder.glob("shard-*.bin")) + list(folder.glob(TEMPORARY_GLOB)):
        if path.name not in listed:  # written by the killed run after its last manifest update
            path.unlink()
    return manifest


def prepare_folder(folder: Path, identity: CacheIdentity, resume: bool, overwrite: bool) -> dict:
    """A manifest to continue: a fresh one, or the validated one of an interrupted run."""
    folder = Path(folder)
    _refuse_foreign_folder(folder)
    exists = (folder / MANIFEST_NAME).exists()
    if exists and resume and not overwrite:
        return _load_for_resume(folder, identity)
    if exists and not overwrite:
        _refuse_existing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_cache_files(folder)
    manifest = identity.new_manifest()
    write_manifest(folder, manifest)
    return manifest


def encode_shard_rows(
    rows: list[dict], compute_logits: CacheLogitsFn, identity: CacheIdentity, batch_size: int,
    pad_token_id: int, on_tokens: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets [rows + 1], records [tokens, record_bytes]) for one shard's rows, in row order."""
    layout = identity.layout
    per_row: list[np.ndarray | None] = [None] * len(rows)
    # Similar lengths in one batch waste less compute on padding; order is restored below.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        batch = pad_rows([rows[i] for i in members], pad_token_id)
        with torch.no_grad():
            logits = compute_logits(batch)[..., : identity.vocab_size]
            flat = logits[batch["attention_mask"].to(logits.device).bool()]
            pieces = []
            for chunk in range(0, flat.shape[0], TOKENS_PER_TOPK_CHUNK):
                ids, logprobs, tail = topk_signal(flat[chunk : chunk + TOKENS_PER_TOPK_CHUNK], identity.k, identity.temperature)
                pieces.append(encode_records(layout, ids.cpu().numpy(), logprobs.cpu().numpy(), tail.cpu().numpy()))
        records = np.concatenate(pieces) if pieces else np.zeros((0, layout.record_bytes), np.uint8)
        lengths = [len(rows[i]["input_ids"]) for i in members]
        for member, block in zip(members, np.split(records, np.cumsum(lengths)[:-1])):
            per_row[member] = block
        on_tokens(int(sum(lengths)))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([block.shape[0] for block in per_row])
    return offsets, np.concatenate(per_row) if rows else np.zeros((0, layout.record_bytes), np.uint8)


def _progress_bar(enabled: bool):
    return Progress(
        TextColumn("[bold]cache-logits"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
        TextColumn("shard {task.fields[shard]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )


def write_logit_cache(
    folder: str | Path,
    rows,
    compute_logits: CacheLogitsFn,
    identity: CacheIdentity,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Compute (or finish computing) the cache of `rows`; returns the final manifest.

    compute_logits(batch) gets {"input_ids", "attention_mask"[, "position_ids"]}
    (CPU, right-padded) and returns teacher logits [B, L, >= V] on any device.
    """
    folder = Path(folder)
    if len(rows) != identity.num_rows:
        raise ValueError(f"identity says {identity.num_rows} rows, got {len(rows)}")
    manifest = prepare_folder(folder, identity, resume, overwrite)
    done_tokens = sum(entry["tokens"] for entry in manifest["shards"])
    with _progress_bar(progress) as bar:
        task = bar.add_task("cache", total=identity.num_tokens, completed=done_tokens, shard="")
        done = {entry["index"] for entry in manifest["shards"]}  # not a prefix after a multi-process run
        for index in (i for i in range(identity.num_shards) if i not in done):
            start, stop = identity.shard_bounds(index)
            bar.update(task, shard=f"{index + 1}/{identity.num_shards}")
            offsets, records = encode_shard_rows(
                [rows[i] for i in range(start, stop)], compute_logits, identity, batch_size, pad_token_id,
                lambda n: bar.advance(task, n),
            )
            name = shard_name(index)
            size, checksum = write_shard(folder / name, offsets, records)
            manifest["shards"].append(
                {"index": index, "file": name, "rows": [start, stop], "tokens": int(offsets[-1]), "bytes": size, "sha256": checksum}
            )
            write_manifest(folder, manifest)
    manifest["shards"].sort(key=lambda entry: entry["index"])
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return manifest
