"""What a logit cache was made from, and the checks that refuse a cache that does not fit.

A cache is only valid for the exact token rows it was computed on, the teacher
and tokenizer that computed them, and the temperature of the stored
log-probabilities. Those facts are written into the manifest and compared,
field by field, when a run resumes writing or a training run reads the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from alambic.cache.format import FORMAT_NAME, FORMAT_VERSION, RecordLayout
from alambic.errors import DataError

# Parameters sampled per tensor for the weight hash: enough that two checkpoints
# (fine-tunes change nearly every weight) differ, cheap for 70B models.
WEIGHT_SAMPLES_PER_TENSOR = 4096


@dataclass(frozen=True)
class CacheIdentity:
    teacher: str
    teacher_revision: str | None
    teacher_weight_hash: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    value_bits: int
    temperature: float
    dataset_fingerprint: str
    rows_hash: str
    num_rows: int
    num_tokens: int
    shard_rows: int

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout(self.vocab_size, self.k, self.value_bits)

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_rows // self.shard_rows))

    def shard_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)

    def new_manifest(self) -> dict:
        layout = self.layout
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "identity": asdict(self),
            "encoding": {
                "ids": "elias-fano set (ascending ids)",
                "logprobs": "uniform in log space on [x_min, 0] relative to the top-1, renormalised with the tail",
                "value_bits": self.value_bits,
                "record_bytes": layout.record_bytes,
                "header": "x_min float16, tail_logmass float32",
            },
            "bytes_per_token": layout.record_bytes,
            "num_shards": self.num_shards,
            "shards": [],
            "complete": False,
        }

    @classmethod
    def from_manifest(cls, manifest: dict, where: str) -> "CacheIdentity":
        stored = manifest.get("identity")
        names = {f.name for f in fields(cls)}
        if not isinstance(stored, dict) or set(stored) != names:
            raise DataError(
                f"{where}: the manifest's identity section is missing or has unexpected keys",
                "the cache was written by another version or edited; delete it and run `alambic cache-logits` again",
            )
        return cls(**stored)


def identity_differences(stored: CacheIdentity, wanted: CacheIdentity, keys: tuple[str, ...] | None = None) -> list[str]:
    """'field: cache has X, this run has Y' for every field that differs."""
    differences = []
    for name in keys or tuple(f.name for f in fields(CacheIdentity)):
        have, want = getattr(stored, name), getattr(wanted, name)
        if isinstance(have, float) or isinstance(want, float):
            same = have is not None and want is not None and abs(float(have) - float(want)) <= 1e-9
        else:
            same = have == want
        if not same:
            differences.append(f"{name}: cache has {have!r}, this run has {want!r}")
    return differences


def rows_hash(rows) -> tuple[str, int]:
    """(sha256 of every row's token ids, total tokens): the exact data the cache is aligned to."""
    digest = hashlib.sha256()
    total = 0
    for index in range(len(rows)):
        ids = np.asarray(rows[index]["input_ids"], dtype="<i8")
        digest.update(np.int64(ids.size).tobytes())
        digest.update(ids.tobytes())
        total += int(ids.size)
    return digest.hexdigest()[:32], total


def tokenizer_hash(tokenizer) -> str:
    """Hash of the id <-> token mapping and the special tokens (what the cached ids mean)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    payload = json.dumps({"vocab": vocab, "special": special}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@torch.no_grad()
def weight_hash(model: torch.nn.Module) -> str:
    """Hash of every tensor's name, shape, dtype and an evenly strided sample of its values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // WEIGHT_SAMPLES_PER_TENSOR)
        sample = flat[::step][:WEIGHT_SAMPLES_PER_TENSOR].float().cpu().numpy()
        digest.update(sample.astype("<f4").tobytes())
    return digest.hexdigest()[:32]
