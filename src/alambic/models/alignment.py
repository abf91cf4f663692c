"""Token alignment between two tokenizers through the text they both encode.

Cross-tokenizer distillation compares a teacher and a student that cut the same
text into different tokens. Two things are needed:

- Positions: a student position and a teacher position can be compared when
  both models have read exactly the same prefix of the text, i.e. when their
  tokens end at the same character. Both next-token distributions are then
  conditioned on the same text (`align_positions`).
- Vocabulary (token-alignment method): each teacher token is mapped to the
  student token with the same bytes, or else to the first student token of its
  text (`vocabulary_map`). The teacher's next-token probabilities are then
  summed onto the student vocabulary.

Tokens are compared by their bytes: byte-level BPE tokens that hold part of a
UTF-8 character have no text of their own, but they do have bytes.

    python -c "from alambic.models.alignment import align_positions as a; print(a([0, 3, 5, 9], [0, 5, 9]))"
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from alambic.errors import ModelError

SENTENCEPIECE_SPACE = "\u2581"  # "▁", the word-initial space of SentencePiece pieces
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_level_alphabet() -> dict[str, int]:
    """The printable character that byte-level BPE uses for each byte, inverted (char -> byte).

    Printable Latin-1 bytes stand for themselves; the others (control
    characters, space, ...) are shifted to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = set(printable)
    table = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in shown:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return decoder is not None and "ByteLevel" in type(decoder).__name__ + repr(decoder)[:40]


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes of every token id (None for special tokens, which stand for no text).

    Byte-level BPE pieces are read through the byte alphabet; SentencePiece
    pieces keep their word-initial space ("▁") and byte-fallback pieces
    ("<0x0A>") are that byte; anything else is decoded on its own.
    """
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    alphabet = byte_level_alphabet() if _is_byte_level(tokenizer) else None
    result: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            result.append(None)
        elif alphabet is not None and all(ch in alphabet for ch in piece):
            result.append(bytes(alphabet[ch] for ch in piece))
        elif BYTE_FALLBACK.fullmatch(piece):
            result.append(bytes([int(piece[3:5], 16)]))
        elif SENTENCEPIECE_SPACE in piece:
            result.append(piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8"))
        else:
            result.append(tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8"))
    return result


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def vocabulary_map(teacher_tokenizer, student_tokenizer) -> torch.Tensor:
    """[teacher vocab] student id for each teacher token, -1 when it has no counterpart.

    Special tokens map by role (eos -> eos, ...) or by the same token string;
    other tokens map to the student token with the same bytes, else to the
    first student token of their text.
    """
    student_by_bytes: dict[bytes, int] = {}
    for student_id, piece in enumerate(token_bytes(student_tokenizer)):
        if piece:
            student_by_bytes.setdefault(piece, student_id)
    mapping = torch.full((len(teacher_tokenizer),), -1, dtype=torch.long)
    for teacher_id, piece in enumerate(token_bytes(teacher_tokenizer)):
        if not piece:
            continue
        if piece in student_by_bytes:
            mapping[teacher_id] = student_by_bytes[piece]
            continue
        text = piece.decode("utf-8", errors="ignore")
        first = student_tokenizer(text, add_special_tokens=False)["input_ids"][:1] if text else []
        if first:
            mapping[teacher_id] = first[0]
    for teacher_id, student_id in _special_pairs(teacher_tokenizer, student_tokenizer):
        mapping[teacher_id] = student_id
    return mapping


def _special_pairs(teacher_tokenizer, student_tokenizer) -> list[tuple[int, int]]:
    pairs = {}
    student_vocab = student_tokenizer.get_vocab()
    for teacher_id in teacher_tokenizer.all_special_ids:
        token = teacher_tokenizer.convert_ids_to_tokens(teacher_id)
        if token in student_vocab:
            pairs[teacher_id] = student_vocab[token]
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        teacher_id, student_id = getattr(teacher_tokenizer, role, None), getattr(student_tokenizer, role, None)
        if teacher_id is not None and student_id is not None:
            pairs.setdefault(teacher_id, student_id)
    return sorted(pairs.items())


def char_ends(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(token ids, character offset where each token ends) of `text`, without special tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"token alignment needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not one",
            "use a tokenizer with a tokenizer.json (a 'fast' tokenizer)",
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]


def align_positions(student_ends: Sequence[int | None], teacher_ends: Sequence[int | None]) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs whose tokens end at the same character.

    When several tokens end at the same character (pieces of one multi-byte
    character), the last of them is the one that has read the whole prefix.
    Positions with no end (None) are never aligned.
    """
    teacher_last = {end: position for position, end in enumerate(teacher_ends) if end is not None}
    student_last = {end: position for position, end in enumerate(student_ends) if end is not None}
    return [(student_last[end], teacher_last[end]) for end in sorted(student_last) if end in teacher_last]


def student_row_ends(tokenizer, row_ids: Sequence[int]) -> tuple[str, list[int | None]]:
    """The text of one student row and the character end of each of its positions.

    A leading BOS-like special token is "before the text" (end 0); other special
    tokens get no end. Content offsets come from re-encoding the decoded text;
    from the first token where that differs from the row (e.g. a word cut by
    truncation) on, positions are left unaligned rather than guessed.
    """
    special = set(tokenizer.all_special_ids)
    content = [token for token in row_ids if token not in special]
    text = tokenizer.decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    ids, ends = char_ends(tokenizer, text)
    agreed = 0
    while agreed < min(len(ids), len(content)) and ids[agreed] == content[agreed]:
        agreed += 1
    result: list[int | None] = []
    content_index = 0
    for position, token in enumerate(row_ids):
        if token in special:
            result.append(0 if position == 0 else None)
            continue
        result.append(ends[content_index] if content_index < agreed else None)
        content_index += 1
    return text, result
