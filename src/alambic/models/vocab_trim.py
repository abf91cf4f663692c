"""Vocabulary trimming: keep the tokens a domain uses, remap the tokenizer and the embedding rows.

A BERT-family vocabulary has 30,522 WordPiece tokens; a news classifier's texts use a
few thousand, and the embedding matrix is most of a small encoder's parameters. Kept:
every token that occurs in the given domain texts (encoded by the teacher's tokenizer),
the special tokens, and (by default) every single ASCII character with its `##` form, so
that any unseen word can still be spelled rather than becoming [UNK].

The trimmed tokenizer encodes the domain texts to the same tokens as before, with new
ids: WordPiece takes the longest vocabulary entry at each point of a word, and every
entry it took on those texts is kept, while the removed entries were never taken there.
New ids follow the old order, so [PAD] and the other special tokens keep their order.

Only WordPiece tokenizers (BERT, DistilBERT, MiniLM, ELECTRA) are supported; any other
is refused with a clear error.

    alambic init-student configs/init_student_classifier.yaml
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from alambic.errors import ModelError


def _tokenizer_json(tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise ModelError(f"vocabulary trimming needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} "
                             "has no tokenizer.json", "use a BERT-family teacher with a fast WordPiece tokenizer")
        return json.loads(path.read_text(encoding="utf-8"))


def check_wordpiece(tokenizer) -> dict:
    """The tokenizer's JSON, or a ModelError when its model is not WordPiece."""
    spec = _tokenizer_json(tokenizer)
    kind = spec.get("model", {}).get("type")
    if kind != "WordPiece":
        raise ModelError(f"vocabulary trimming supports WordPiece tokenizers (BERT family); this one is {kind}",
                         "remove the vocab section (keep the whole vocabulary) or use a BERT-family teacher")
    return spec


def count_tokens(tokenizer, texts: list[str], max_length: int | None) -> Counter:
    counts: Counter = Counter()
    for start in range(0, len(texts), 256):
        encoded = tokenizer(texts[start : start + 256], truncation=max_length is not None, max_length=max_length)
        for ids in encoded["input_ids"]:
            counts.update(ids)
    return counts


def kept_token_ids(tokenizer, texts: list[str], max_length: int | None, min_count: int = 1,
                   keep_ascii_characters: bool = True) -> list[int]:
    """Old ids to keep, increasing: tokens used >= min_count times, special tokens, ASCII characters."""
    vocab = tokenizer.get_vocab()
    keep = {i for i, n in count_tokens(tokenizer, texts, max_length).items() if n >= min_count}
    keep |= set(tokenizer.all_special_ids)
    if keep_ascii_characters:
        for token, index in vocab.items():
            bare = token[2:] if token.startswith("##") else token
            if len(bare) == 1 and bare.isascii():
                keep.add(index)
    return sorted(keep)


VOCAB_MAP = "vocab_map.json"  # the teacher id of every student id (teachers/vocab_map.py reads it)


def write_vocab_map(folder: Path, kept: list[int], teacher_vocab_size: int) -> None:
    from alambic.durable import atomic_write_json

    atomic_write_json(Path(folder) / VOCAB_MAP, {"teacher_ids": list(kept), "teacher_vocab_size": teacher_vocab_size})


def _remap_ids(node, mapping: dict[int, int]):
    """Every {"ids": [...]} list inside a post-processor, remapped."""
    if isinstance(node, dict):
        return {k: ([mapping[i] for i in v] if k == "ids" and isinstance(v, list) else _remap_ids(v, mapping))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_remap_ids(item, mapping) for item in node]
    return node


def trimmed_tokenizer(tokenizer, keep: list[int]):
    """A tokenizer with only the `keep` tokens, their new ids in the order of the old ones."""
    from transformers import AutoTokenizer

    spec = check_wordpiece(tokenizer)
    mapping = {old: new for new, old in enumerate(keep)}
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    spec["model"]["vocab"] = {by_id[old]: new for old, new in mapping.items() if old in by_id}
    missing = [t["content"] for t in spec.get("added_tokens", []) if t["id"] not in mapping]
    if missing:
        raise ModelError(f"the kept vocabulary lacks the added tokens {missing}")
    for token in spec.get("added_tokens", []):
        token["id"] = mapping[token["id"]]
    spec["post_processor"] = _remap_ids(spec.get("post_processor"), mapping)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            config["added_tokens_decoder"] = {str(mapping[int(k)]): v for k, v in decoder.items() if int(k) in mapping}
        config_path.write_text(json.dumps(config, indent=2))
        for stale in ("vocab.txt",):  # a slow-tokenizer vocabulary would disagree with the new ids
            (Path(folder) / stale).unlink(missing_ok=True)
        return AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def trim_embeddings(model, keep: list[int]) -> None:
    """Keep the `keep` rows of the input embeddings (and of a tied output layer), in place."""
    old = model.get_input_embeddings()
    index = torch.tensor(keep, dtype=torch.long)
    new = torch.nn.Embedding(len(keep), old.weight.shape[1], padding_idx=None)
    new.weight.copy_(old.weight[index])
    model.set_input_embeddings(new)
    model.config.vocab_size = len(keep)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        model.config.pad_token_id = keep.index(pad) if pad in keep else 0


def trim_vocabulary(model, tokenizer, texts: list[str], max_length: int | None, min_count: int = 1,
                    keep_ascii_characters: bool = True):
    """(model with trimmed embeddings, trimmed tokenizer, kept old ids)."""
    if model.get_output_embeddings() is not None:
        raise ModelError(f"vocabulary trimming of a {type(model).__name__} (it has an output vocabulary layer) is "
                         "not supported", "trim encoder classifiers only, or remove the vocab section")
    keep = kept_token_ids(tokenizer, texts, max_length, min_count, keep_ascii_characters)
    new_tokenizer = trimmed_tokenizer(tokenizer, keep)
    trim_embeddings(model, keep)
    return model, new_tokenizer, keep


def _vocab_config_class():
    from pydantic import Field

    from alambic.config import Strict

    class VocabConfig(Strict):
        """init-student's `vocab:` section: keep only the tokens the domain uses (encoder classifiers)."""

        texts: list[str] = Field(default_factory=list, description="text files of the domain (default: data.calibration)")
        min_count: int = Field(1, ge=1, description="keep tokens used at least this many times")
        keep_ascii_characters: bool = Field(True, description="also keep every ASCII character and its ## form")

    return VocabConfig


VocabConfig = _vocab_config_class()
