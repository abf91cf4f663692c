"""Read a logit cache: validated manifest, checksummed shards, batched decoding.

Shards are memory-mapped, and each one's sha256 is checked the first time it is
touched (or all at open with verify="all"), so a damaged cache is refused with
the name of the bad file before any of its values reach a loss.

    python -c "from alambic.cache.reader import LogitCache; c = LogitCache('runs/cache'); print(c.describe())"
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alambic.cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    RecordDecodeError,
    decode_records,
    read_shard,
    sha256_file,
)
from alambic.cache.identity import CacheIdentity
from alambic.errors import DataError

OPEN_SHARDS = 64  # memory maps kept open at once (each holds a file descriptor)
# NumPy releases the GIL in the decode's array operations, so threads decode
# slices of a large batch in parallel; below this many tokens a thread costs more than it saves.
TOKENS_PER_DECODE_THREAD = 2048
REBUILD_HINT = "delete the cache folder and run `alambic cache-logits` again"


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise DataError(
            f"{folder} is not a logit cache: {MANIFEST_NAME} is missing",
            "point teacher.cache at a folder written by `alambic cache-logits`",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"the logit cache manifest {path} is unreadable: {err}", REBUILD_HINT) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not an alambic logit-cache manifest", REBUILD_HINT)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} uses cache format version {manifest.get('format_version')}; this alambic reads version {FORMAT_VERSION}",
            REBUILD_HINT,
        )
    if not isinstance(manifest.get("shards"), list):
        raise DataError(f"{path} lists no shards", REBUILD_HINT)
    return manifest


class LogitCache:
    """Random access to the cached top-k distributions of a dataset's rows."""

    def __init__(self, folder: str | Path, verify: str = "lazy", decode_threads: int | None = None):
        if verify not in ("lazy", "all", "none"):
            raise ValueError(f"verify must be 'lazy', 'all' or 'none', got {verify!r}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.identity = CacheIdentity.from_manifest(self.manifest, str(self.folder))
        self.layout = self.identity.layout
        self._verify = verify
        self._check_complete()
        self._shards = sorted(self.manifest["shards"], key=lambda entry: entry["rows"][0])
        self._row_starts = [entry["rows"][0] for entry in self._shards]
        self._verified: set[int] = set()
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._decode_threads = max(1, decode_threads or min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        if verify == "all":
            for position in range(len(self._shards)):
                self._check_checksum(position)

    # ------------------------------------------------------------------ checks

    def _check_complete(self) -> None:
        shards = self.manifest["shards"]
        if not self.manifest.get("complete") or len(shards) != self.identity.num_shards:
            raise DataError(
                f"the logit cache in {self.folder} is incomplete ({len(shards)} of "
                f"{self.identity.num_shards} shards written)",
                "finish it with `alambic cache-logits CONFIG --out FOLDER --resume`",
            )
        for entry in shards:
            path = self.folder / entry["file"]
            if not path.exists():
                raise DataError(f"shard {entry['file']} of the logit cache {self.folder} is missing", REBUILD_HINT)
            if path.stat().st_size != entry["bytes"]:
                raise DataError(
                    f"shard {entry['file']} of the logit cache {self.folder} is corrupted: "
                    f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}",
                    REBUILD_HINT,
                )

    def _check_checksum(self, position: int) -> None:
        if position in self._verified or self._verify == "none":
            return
        entry = self._shards[position]
        if sha256_file(self.folder / entry["file"]) != entry["sha256"]:
            raise DataError(
                f"shard {entry['file']} of the logit cache {self.folder} is corrupted (sha256 mismatch)", REBUILD_HINT
            )
        self._verified.add(position)

    def _shard(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        if position in self._open:
            self._open.move_to_end(position)
            return self._open[position]
        self._check_checksum(position)
        entry = self._shards[position]
        try:
            opened = read_shard(self.folder / entry["file"], self.layout.record_bytes)
        except RecordDecodeError as err:
            raise DataError(f"shard {entry['file']} of the logit cache {self.folder} is corrupted: {err}", REBUILD_HINT) from None
        expected_rows = entry["rows"][1] - entry["rows"][0]
        if opened[0].size != expected_rows + 1:
            raise DataError(f"shard {entry['file']} holds {opened[0].size - 1} rows, the manifest says {expected_rows}", REBUILD_HINT)
        self._open[position] = opened
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return opened

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return self.identity.num_rows

    def row_records(self, row: int) -> np.ndarray:
        """Encoded records [tokens, record_bytes] of dataset row `row`."""
        if not 0 <= row < self.identity.num_rows:
            raise DataError(
                f"row {row} is outside the logit cache {self.folder} ({self.identity.num_rows} rows)",
                "the training data must be the data the cache was computed on",
            )
        position = bisect.bisect_right(self._row_starts, row) - 1
        offsets, records = self._shard(position)
        local = row - self._shards[position]["rows"][0]
        return records[offsets[local] : offsets[local + 1]]

    def decode(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, log-probs, tail) of [N, record_bytes] records, decoded by up to `decode_threads` threads."""
        records = np.asarray(records)
        pieces = min(self._decode_threads, records.shape[0] // TOKENS_PER_DECODE_THREAD)
        try:
            if pieces < 2:
                return decode_records(self.layout, records)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="logit-cache")
            parts = self._pool.map(lambda part: decode_records(self.layout, part), np.array_split(records, pieces))
            ids, logprobs, tail = zip(*parts)
            return np.concatenate(ids), np.concatenate(logprobs), np.concatenate(tail)
        except RecordDecodeError as err:
            raise DataError(f"the logit cache {self.folder} holds a corrupted record: {err}", REBUILD_HINT) from None

    def read_rows(self, rows: list[int], length: int | None = None) -> dict[str, np.ndarray]:
        """Padded arrays for a batch of rows: topk_ids / topk_logprobs [B, L, k], tail_logmass [B, L], lengths [B].

        Positions past a row's end hold a harmless uniform distribution on ids
        0..k-1 with an empty tail; they carry no loss.
        """
        blocks = [self.row_records(int(row)) for row in rows]
        lengths = np.array([block.shape[0] for block in blocks], dtype=np.int64)
        length = int(lengths.max(initial=0)) if length is None else length
        k = self.layout.k
        if (lengths > length).any():
            position = int(np.argmax(lengths > length))
            raise DataError(
                f"row {rows[position]} has {int(lengths[position])} tokens in the logit cache {self.folder}, "
                f"more than the {length} positions of its batch",
                "the training data must be tokenized exactly as when the cache was made; " + REBUILD_HINT,
            )
        ids, logprobs, tail = self.decode(np.concatenate(blocks) if blocks else np.zeros((0, self.layout.record_bytes), np.uint8))
        if len(rows) and (lengths == length).all():  # no padding (e.g. packed rows): reshape only
            return {
                "topk_ids": ids.reshape(len(rows), length, k), "topk_logprobs": logprobs.reshape(len(rows), length, k),
                "tail_logmass": tail.reshape(len(rows), length), "lengths": lengths,
            }
        out_ids = np.broadcast_to(np.arange(k, dtype=np.int64), (len(rows), length, k)).copy()
        out_logprobs = np.full((len(rows), length, k), -np.log(k), dtype=np.float32)
        out_tail = np.full((len(rows), length), -np.inf, dtype=np.float32)
        valid = np.arange(length)[None, :] < lengths[:, None]
        out_ids[valid], out_logprobs[valid], out_tail[valid] = ids, logprobs, tail
        return {"topk_ids": out_ids, "topk_logprobs": out_logprobs, "tail_logmass": out_tail, "lengths": lengths}

    def describe(self) -> str:
        identity = self.identity
        return (
            f"logit cache {self.folder}: teacher {identity.teacher}, {identity.num_rows} rows, "
            f"{identity.num_tokens} tokens, k={identity.k}, {identity.value_bits}-bit values, "
            f"{self.layout.record_bytes} B/token, temperature {identity.temperature}"
        )
