"""The on-disk format of the offline teacher-logit cache: records, shards, manifest.

One *record* per token holds the teacher's top-k distribution at that position
in a fixed number of bytes:

    bytes 0-1   x_min (float16): log p_k - log p_1, the k-th log-prob relative to the top one
    bytes 2-5   tail_logmass (float32): log(1 - sum of the top-k probabilities)
    then bits   the k token ids, lossless, as an Elias-Fano coded *set*
                (ids sorted ascending; k * l low bits + k + ceil(V / 2^l) unary high bits)
    then bits   k value codes of `value_bits` bits each, in the same (id) order:
                x = log p - log p_1 quantised uniformly on [x_min, 0]

Why a set and not a ranked list: k ids in rank order cost k * ceil(log2 V) bits
(272 B at k = 128, V = 128256), while the set costs ~191 B; the rank order is
carried by the values instead. Values are quantised in log space relative to
the top-1 (which is therefore exact) with a per-token range: the error of each
log-probability is at most |x_min| / (2 * (2^bits - 1)) before renormalisation.
On decoding the top-k log-probabilities are renormalised so that they and the
stored tail mass sum to exactly 1.

A *shard* holds a run of dataset rows: an 8-byte magic, the row count, the
record size, row offsets (int64, in tokens) and the records. The manifest
(manifest.json) names the teacher, tokenizer, dataset, k, value coding and
temperature, and lists every finished shard with its size and sha256.

    python -c "from alambic.cache.format import RecordLayout as R; print(R(128256, 128, 3).record_bytes)"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alambic.durable import atomic_write_bytes

FORMAT_NAME = "alambic-logit-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_MAGIC = b"ALMBLC01"
SHARD_HEADER_BYTES = len(SHARD_MAGIC) + 16
RECORD_HEADER_BYTES = 6
# Log-probabilities more than this far below the top-1 carry no usable mass
# (e^-64 ~ 1.6e-28); flooring them keeps x_min finite for masked logits.
RELATIVE_LOGPROB_FLOOR = -64.0
MAX_VALUE_BITS = 16


class RecordDecodeError(ValueError):
    """A record's bits are not a valid encoding (the shard is damaged)."""


@dataclass(frozen=True)
class RecordLayout:
    """Bit layout of one token's record for a vocabulary size, k and value precision."""

    vocab_size: int
    k: int
    value_bits: int

    def __post_init__(self):
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be in [1, vocab_size={self.vocab_size}], got {self.k}")
        if not 1 <= self.value_bits <= MAX_VALUE_BITS:
            raise ValueError(f"value_bits must be in [1, {MAX_VALUE_BITS}], got {self.value_bits}")

    @property
    def low_bits(self) -> int:
        # Elias-Fano's optimum: floor(log2(V / k)) low bits per id.
        return max(0, (self.vocab_size // self.k).bit_length() - 1)

    @property
    def buckets(self) -> int:
        return ((self.vocab_size - 1) >> self.low_bits) + 1

    @property
    def upper_bits(self) -> int:
        return self.k + self.buckets

    @property
    def payload_bits(self) -> int:
        return self.upper_bits + self.k * self.low_bits + self.k * self.value_bits

    @property
    def record_bytes(self) -> int:
        return RECORD_HEADER_BYTES + (self.payload_bits + 7) // 8


def largest_value_bits(vocab_size: int, k: int, max_bytes: int, cap: int = 8) -> int | None:
    """The most value bits (<= cap) whose record fits in `max_bytes`; None if even 1 bit does not."""
    for bits in range(cap, 0, -1):
        if RecordLayout(vocab_size, k, bits).record_bytes <= max_bytes:
            return bits
    return None


def _int_to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """[..., n] non-negative ints -> [..., n * width] bits, most significant first."""
    if width == 0:
        return np.zeros((*values.shape[:-1], 0), dtype=np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = (values[..., None] >> shifts) & 1
    return bits.astype(np.uint8).reshape(*values.shape[:-1], values.shape[-1] * width)


def _read_fields(records: np.ndarray, first_bit: int, count: int, width: int) -> np.ndarray:
    """`count` consecutive `width`-bit big-endian fields starting at bit `first_bit` -> [N, count] uint.

    Each field is read from the few whole bytes that cover it and shifted into
    place, which is several times faster than unpacking every bit.
    """
    if width == 0:
        return np.zeros((records.shape[0], count), dtype=np.uint32)
    last_byte = records.shape[1] - 1
    bit_offsets = first_bit + np.arange(count, dtype=np.int64) * width
    first_bytes = bit_offsets // 8
    span = (width + 7 + 7) // 8  # bytes a field can straddle
    wide = np.uint32 if span <= 4 else np.uint64
    shifts = (8 * span - width - bit_offsets % 8).astype(wide)
    # Bytes past the record's end only feed bits that are shifted out, so clamping is safe.
    acc = np.take(records, np.minimum(first_bytes, last_byte), axis=1).astype(wide)
    for extra in range(1, span):
        acc <<= wide(8)
        acc |= np.take(records, np.minimum(first_bytes + extra, last_byte), axis=1)
    acc >>= shifts
    acc &= wide((1 << width) - 1)
    return acc


def _set_bit_positions(records: np.ndarray, first_byte: int, bit_count: int, ones_per_row: int) -> np.ndarray:
    """Positions of the set bits of each row's `bit_count`-bit field -> [N, ones_per_row]."""
    count = records.shape[0]
    field = np.ascontiguousarray(records[:, first_byte : first_byte + (bit_count + 7) // 8])
    bits = np.unpackbits(field, axis=1, count=bit_count, bitorder="big").view(bool)
    flat = np.flatnonzero(bits)
    if flat.size != count * ones_per_row:
        raise RecordDecodeError("an id set does not hold exactly k ids")
    positions = flat.reshape(count, ones_per_row)
    rows = np.arange(count, dtype=np.int64)[:, None] * bit_count
    # Every row must own exactly its k positions (not k - 1 here and k + 1 there).
    if count and not ((positions[:, 0] >= rows[:, 0]) & (positions[:, -1] < rows[:, 0] + bit_count)).all():
        raise RecordDecodeError("an id set does not hold exactly k ids")
    return positions - rows


def encode_records(
    layout: RecordLayout, topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail_logmass: np.ndarray
) -> np.ndarray:
    """[N, k] ids (any order), [N, k] log-probs, [N] tail log-mass -> [N, record_bytes] uint8."""
    count, k = topk_ids.shape
    if k != layout.k:
        raise ValueError(f"expected {layout.k} ids per token, got {k}")
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids.astype(np.int64), order, axis=1)
    logprobs = np.take_along_axis(topk_logprobs.astype(np.float32), order, axis=1)
    if count and (ids.min() < 0 or ids.max() >= layout.vocab_size):
        raise ValueError(f"token ids must lie in [0, {layout.vocab_size})")
    if k > 1 and count and (np.diff(ids, axis=1) <= 0).any():
        raise ValueError("top-k ids of a token must be distinct")

    relative = np.maximum(logprobs - logprobs.max(axis=1, keepdims=True), RELATIVE_LOGPROB_FLOOR)
    # Quantise against the float16-rounded range the decoder will see, so both agree on the grid.
    x_min16 = relative.min(axis=1).astype("<f2")
    x_min = x_min16.astype(np.float32)
    levels = (1 << layout.value_bits) - 1
    safe_range = np.where(x_min < 0, -x_min, 1.0)
    codes = np.clip(np.rint(relative / -safe_range[:, None] * levels), 0, levels).astype(np.int64)
    codes[x_min >= 0] = 0

    upper = np.zeros((count, layout.upper_bits), dtype=np.uint8)
    high = ids >> layout.low_bits
    upper[np.arange(count)[:, None], high + np.arange(k)] = 1
    low = ids & ((1 << layout.low_bits) - 1)
    payload_bits = np.concatenate(
        [upper, _int_to_bits(low, layout.low_bits), _int_to_bits(codes, layout.value_bits)], axis=1
    )
    payload = np.packbits(payload_bits, axis=1, bitorder="big")
    header = np.concatenate(
        [x_min16.reshape(count, 1).view(np.uint8), tail_logmass.astype("<f4").reshape(count, 1).view(np.uint8)],
        axis=1,
    )
    return np.ascontiguousarray(np.concatenate([header, payload], axis=1))


def decode_records(layout: RecordLayout, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, record_bytes] uint8 -> (ids [N, k] int64 ascending, log-probs [N, k] float32, tail [N] float32).

    Raises RecordDecodeError when the bits cannot be a valid record.
    """
    count, k = records.shape[0], layout.k
    if records.ndim != 2 or records.shape[1] != layout.record_bytes:
        raise RecordDecodeError(f"records must be [N, {layout.record_bytes}] bytes, got {records.shape}")
    x_min = np.ascontiguousarray(records[:, 0:2]).view("<f2").reshape(count).astype(np.float32)
    tail = np.ascontiguousarray(records[:, 2:6]).view("<f4").reshape(count).astype(np.float32)
    high = _set_bit_positions(records, RECORD_HEADER_BYTES, layout.upper_bits, k) - np.arange(k)
    first_bit = 8 * RECORD_HEADER_BYTES + layout.upper_bits
    ids = (high << layout.low_bits) | _read_fields(records, first_bit, k, layout.low_bits)
    if count and ids.max() >= layout.vocab_size:
        raise RecordDecodeError("a token id lies outside the vocabulary")
    codes = _read_fields(records, first_bit + k * layout.low_bits, k, layout.value_bits)
    if not (np.isfinite(x_min).all() and x_min.max(initial=0.0) <= 0 and not np.isnan(tail).any()):
        raise RecordDecodeError("a record header holds an impossible value")

    levels = (1 << layout.value_bits) - 1
    relative = codes.astype(np.float32)
    relative *= (x_min / levels)[:, None]
    # The top-1 is coded 0, so max(relative) = 0 and the log-sum-exp needs no shift.
    log_sum = np.log(np.exp(relative).sum(axis=1))
    with np.errstate(divide="ignore"):
        log_topk_mass = np.log(-np.expm1(np.minimum(tail, 0.0)))
    relative += (log_topk_mass - log_sum)[:, None]
    return ids, relative, tail


# ----------------------------------------------------------------------------- files


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: Path, row_offsets: np.ndarray, records: np.ndarray) -> tuple[int, str]:
    """Write one shard atomically; returns (bytes, sha256)."""
    header = SHARD_MAGIC + np.array([len(row_offsets) - 1, records.shape[1]], dtype="<u8").tobytes()
    body = [header, row_offsets.astype("<i8").tobytes(), memoryview(np.ascontiguousarray(records)).cast("B")]
    atomic_write_bytes(path, body)
    return path.stat().st_size, sha256_file(path)


def read_shard(path: Path, record_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_offsets [rows + 1] int64, records [tokens, record_bytes] uint8 memory map)."""
    header = np.fromfile(path, dtype=np.uint8, count=SHARD_HEADER_BYTES)
    if header.size < SHARD_HEADER_BYTES or header[: len(SHARD_MAGIC)].tobytes() != SHARD_MAGIC:
        raise RecordDecodeError(f"{path.name} is not a logit-cache shard (bad magic)")
    rows, stored_record_bytes = header[len(SHARD_MAGIC) :].view("<u8")
    if int(stored_record_bytes) != record_bytes:
        raise RecordDecodeError(f"{path.name} has {stored_record_bytes}-byte records, the manifest says {record_bytes}")
    offsets = np.fromfile(path, dtype="<i8", count=int(rows) + 1, offset=SHARD_HEADER_BYTES)
    start = SHARD_HEADER_BYTES + 8 * (int(rows) + 1)
    tokens = int(offsets[-1]) if offsets.size else 0
    if offsets.size != int(rows) + 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise RecordDecodeError(f"{path.name} has invalid row offsets")
    if path.stat().st_size != start + tokens * record_bytes:
        raise RecordDecodeError(f"{path.name} has the wrong size for {tokens} records")
    if tokens == 0:
        return offsets, np.zeros((0, record_bytes), dtype=np.uint8)
    records = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(tokens, record_bytes))
    return offsets, records


def write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    atomic_write_bytes(folder / MANIFEST_NAME, text.encode("utf-8"))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"
