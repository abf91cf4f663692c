"""Cross-tokenizer losses (ULD, projected KL) and the token alignment between two tokenizers."""

from __future__ import annotations

import json.decoder
import string
import textwrap
from pathlib import Path

import pytest
import torch

from alambic.data.stdlib_corpus import build_tokenizer
from alambic.losses.cross_tokenizer import project_teacher_probs, projected_teacher_kl, uld_distance
from alambic.models.alignment import (
    align_positions,
    byte_level_alphabet,
    char_ends,
    student_row_ends,
    token_bytes,
    vocabulary_map,
)

SAMPLE = "def parse(value):\n    return {'é': value * 2}  # ✓ 日本\n"


@pytest.fixture(scope="module")
def tokenizers():
    # A few stdlib modules read directly: walking the whole stdlib is slow.
    texts = [Path(module.__file__).read_text(encoding="utf-8") for module in (textwrap, string, json.decoder)]
    return build_tokenizer(texts, 400), build_tokenizer(texts, 300)


def test_uld_is_zero_for_identical_and_for_permuted_vocabularies():
    torch.manual_seed(0)
    logits = torch.randn(5, 11) * 3
    assert torch.allclose(uld_distance(logits, logits), torch.zeros(5), atol=1e-6)
    permuted = logits[:, torch.randperm(11)]
    assert torch.allclose(uld_distance(permuted, logits), torch.zeros(5), atol=1e-6)


def test_uld_is_positive_for_different_distributions_and_pads_the_shorter_vocab():
    torch.manual_seed(0)
    sharp, flat = torch.randn(4, 9) * 5, torch.zeros(4, 9)
    assert (uld_distance(sharp, flat) > 0.1).all()
    # A 3-token teacher with all mass on one token vs a 9-token student with all mass on one token: same shape.
    peaked_small = torch.tensor([[30.0, 0.0, 0.0]])
    peaked_large = torch.tensor([[0.0] * 4 + [30.0] + [0.0] * 4])
    assert uld_distance(peaked_large, peaked_small).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_distance(torch.zeros(1, 9), peaked_small).item() > 1.0


def test_uld_has_gradients_for_the_student():
    student = torch.randn(3, 8, requires_grad=True)
    uld_distance(student, torch.randn(3, 5) * 4).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_projection_sums_teacher_mass_onto_mapped_student_tokens():
    teacher_probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    vocab_map = torch.tensor([1, 1, 0, -1])  # token 3 has no student counterpart: its mass is dropped
    projected = project_teacher_probs(teacher_probs, vocab_map, 3)
    assert torch.allclose(projected, torch.tensor([[0.2, 0.7, 0.0]]) / 0.9)


def test_projected_kl_is_zero_with_the_identity_map_and_equal_logits():
    logits = torch.randn(4, 6)
    identity = torch.arange(6)
    assert torch.allclose(projected_teacher_kl(logits, logits, identity), torch.zeros(4), atol=1e-5)
    assert (projected_teacher_kl(logits, logits.flip(-1), identity) > 0).all()


def test_byte_level_alphabet_covers_every_byte_once():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert table["!"] == ord("!") and table[chr(256 + 32)] == ord(" ")  # space is the 33rd non-printable byte


def test_identical_tokenizers_align_to_the_identity(tokenizers):
    tokenizer, _ = tokenizers
    assert torch.equal(vocabulary_map(tokenizer, tokenizer), torch.arange(len(tokenizer)))
    ids, ends = char_ends(tokenizer, SAMPLE)
    row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    text, row_ends = student_row_ends(tokenizer, row)
    assert text == SAMPLE
    pairs = align_positions(row_ends, row_ends)
    # Oracle from decoding alone: a position is comparable once its decoded prefix is whole text;
    # of several positions with the same prefix (pieces of one character) the last one counts.
    last_with_prefix = {"": 0}
    for position in range(1, len(row) - 1):
        prefix = tokenizer.decode(row[1 : position + 1])
        if "\ufffd" not in prefix and SAMPLE.startswith(prefix):
            last_with_prefix[prefix] = position
    expected = sorted(last_with_prefix.values())
    assert pairs == [(p, p) for p in expected]
    assert len(expected) < len(row) - 1  # the sample has characters split across tokens


def test_different_tokenizers_align_where_token_ends_coincide(tokenizers):
    big, small = tokenizers
    big_ids, big_ends = char_ends(big, SAMPLE)
    small_ids, small_ends = char_ends(small, SAMPLE)
    assert big_ids != small_ids  # the test needs two different tokenizations
    pairs = align_positions(small_ends, big_ends)
    assert pairs and pairs[-1] == (len(small_ids) - 1, len(big_ids) - 1)  # both have read the whole text
    for student_position, teacher_position in pairs:
        prefix_small = small.decode(small_ids[: student_position + 1])
        prefix_big = big.decode(big_ids[: teacher_position + 1])
        assert prefix_small == prefix_big
    assert len(pairs) < len(small_ids)  # some positions end mid-token of the other tokenizer


def test_vocabulary_map_matches_token_bytes_or_first_token(tokenizers):
    big, small = tokenizers
    mapping = vocabulary_map(big, small)
    big_bytes, small_bytes = token_bytes(big), token_bytes(small)
    assert (mapping >= 0).all()
    for teacher_id in range(len(big)):
        piece = big_bytes[teacher_id]
        if piece is None:
            continue
        target = small_bytes[mapping[teacher_id]]
        assert piece.startswith(target), (teacher_id, piece, target)
    assert mapping[big.eos_token_id] == small.eos_token_id


def test_student_row_stops_aligning_where_reencoding_differs(tokenizers):
    tokenizer, _ = tokenizers
    ids, _ = char_ends(tokenizer, "value = compute(value)")
    # A row whose last token was split differently than the tokenizer would (two single-byte tokens).
    split = tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(ids[-2])))
    if len(split) < 2:
        pytest.skip("the chosen token is a single byte")
    row = [*ids[:-2], *split, ids[-1]]
    _, ends = student_row_ends(tokenizer, row)
    assert all(end is not None for end in ends[: len(ids) - 2])
    assert all(end is None for end in ends[len(ids) - 2 :])


def _sentencepiece_style_tokenizer(texts):
    """A Metaspace ("▁word") BPE with byte fallback, like Llama-2 / Mistral tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_pieces_keep_their_space_and_bytes(tokenizers):
    _, byte_level = tokenizers
    texts = [Path(module.__file__).read_text(encoding="utf-8") for module in (textwrap, string)]
    sentencepiece = _sentencepiece_style_tokenizer(texts)
    pieces = token_bytes(sentencepiece)
    vocab = sentencepiece.get_vocab()
    assert pieces[vocab["<0x0A>"]] == b"\n"
    word = next(piece for piece in vocab if piece.startswith("\u2581") and len(piece) > 3)
    assert pieces[vocab[word]] == b" " + word[1:].encode()
    mapping = vocabulary_map(sentencepiece, byte_level)
    student_pieces = token_bytes(byte_level)
    assert mapping[vocab[word]] >= 0 and pieces[vocab[word]].startswith(student_pieces[mapping[vocab[word]]])
    assert mapping[sentencepiece.eos_token_id] == byte_level.eos_token_id
