"""Write what a served teacher returns into the logit-cache format, as training streams through the data.

Rows arrive in training order; a shard (a run of `shard_rows` dataset rows) is
written atomically, checksummed and added to the manifest as soon as all its
rows have been seen, so a killed run keeps every finished shard and a resumed
run continues the same folder. `missing_rows()` lists what the server still has
to score for the cache to be complete (the source requests them at the end of
training). The result is read like any cache:

    alambic distill CONFIG teacher.server=null teacher.cache=FOLDER ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alambic.cache.format import encode_records, shard_name, write_manifest, write_shard
from alambic.cache.identity import CacheIdentity, rows_hash, tokenizer_hash
from alambic.cache.writer import prepare_folder
from alambic.errors import ConfigError


class StreamCacheWriter:
    def __init__(self, folder: str | Path, train_data, tokenizer, teacher: str, k: int, vocab_size: int,
                 value_bits: int, shard_rows: int):
        digest, tokens = rows_hash(train_data)
        self.identity = CacheIdentity(
            teacher=teacher, teacher_revision=None, teacher_weight_hash="served", tokenizer_hash=tokenizer_hash(tokenizer),
            vocab_size=vocab_size, k=k, value_bits=value_bits, temperature=1.0,
            dataset_fingerprint=str(getattr(train_data, "fingerprint", "")), rows_hash=digest,
            num_rows=len(train_data), num_tokens=tokens, shard_rows=shard_rows,
        )
        self.folder = Path(folder)
        self.train_data = train_data
        # Continues a folder made with the same identity (a resumed run); refuses anything else.
        self.manifest = prepare_folder(self.folder, self.identity, resume=True, overwrite=False)
        self.done = {entry["index"] for entry in self.manifest["shards"]}
        self.rows: dict[int, np.ndarray] = {}

    def wants(self, row: int, ids: list[int]) -> bool:
        """A dataset row not yet stored, with its dataset tokens (an on-policy sample is not the row)."""
        if row in self.rows or row // self.identity.shard_rows in self.done:
            return False
        return list(self.train_data[row]["input_ids"]) == list(ids)

    def add(self, row: int, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> None:
        if (ids < 0).any():
            raise ConfigError(
                "the teacher server gave no distribution after a row's last token, which the cache stores",
                "serve with vLLM (it returns `logprobs` keyed by token id with return_tokens_as_token_ids), "
                "or drop teacher.served.stream_cache",
            )
        self.rows[row] = encode_records(self.identity.layout, ids, logprobs, tail)
        shard = row // self.identity.shard_rows
        start, stop = self.identity.shard_bounds(shard)
        if all(r in self.rows for r in range(start, stop)):
            self._write(shard, start, stop)

    def _write(self, shard: int, start: int, stop: int) -> None:
        blocks = [self.rows.pop(r) for r in range(start, stop)]
        offsets = np.zeros(len(blocks) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([block.shape[0] for block in blocks])
        name = shard_name(shard)
        size, checksum = write_shard(self.folder / name, offsets, np.concatenate(blocks))
        self.manifest["shards"].append({"index": shard, "file": name, "rows": [start, stop],
                                        "tokens": int(offsets[-1]), "bytes": size, "sha256": checksum})
        self.manifest["shards"].sort(key=lambda entry: entry["index"])
        self.done.add(shard)
        if len(self.done) == self.identity.num_shards:
            self.manifest["complete"] = True
        write_manifest(self.folder, self.manifest)

    def missing_rows(self) -> list[int]:
        missing = []
        for shard in range(self.identity.num_shards):
            if shard not in self.done:
                start, stop = self.identity.shard_bounds(shard)
                missing += [r for r in range(start, stop) if r not in self.rows]
        return missing

    @property
    def complete(self) -> bool:
        return len(self.done) == self.identity.num_shards
