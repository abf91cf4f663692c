"""A micro setup for the mode tests: tiny random models on a tiny tokenizer, built in about a second.

The mode tests check mechanics (which signal, which parameters train, what is
exported), which do not need a trained teacher, so they skip the session's
trained tiny_setup and stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alambic.data.stdlib_corpus import build_tokenizer
from alambic.testing import chunk_text, tiny_llama

_TEXT = (Path(json.__file__).read_text() + Path(torch.__file__).read_text())[:20000]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bert(vocab: int, hidden: int, layers: int, heads: int, seed: int, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def build_micro(folder: Path, vocab_size: int = 320) -> dict:
    """Paths of: train/eval text data, two teachers (hidden 64, 2 layers), a student and a peer
    (hidden 32, 2 layers), and the same for a BERT classifier."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = chunk_text(_TEXT, 160)
    tokenizer = build_tokenizer(chunks, vocab_size)
    vocab = len(tokenizer)
    paths = {
        "train": _write_jsonl(folder / "train.jsonl", [{"text": c, "teacher": "a" if i % 2 else "b"} for i, c in enumerate(chunks[:16])]),
        "eval": _write_jsonl(folder / "eval.jsonl", [{"text": c, "teacher": "a"} for c in chunks[16:20]]),
        "teacher": _save(tiny_llama(vocab, hidden=64, layers=2, heads=4, seed=0), tokenizer, folder / "teacher"),
        "teacher_b": _save(tiny_llama(vocab, hidden=64, layers=2, heads=4, seed=7), tokenizer, folder / "teacher_b"),
        "student": _save(tiny_llama(vocab, hidden=32, layers=2, heads=2, seed=1), tokenizer, folder / "student"),
        "peer": _save(tiny_llama(vocab, hidden=32, layers=2, heads=2, seed=2), tokenizer, folder / "peer"),
        "cls_train": _write_jsonl(folder / "cls.jsonl", [{"text": c, "label": i % 3} for i, c in enumerate(chunks[:12])]),
        "bert_teacher": _save(tiny_bert(vocab, 64, 2, 4, seed=3), tokenizer, folder / "bert_teacher"),
        "bert_student": _save(tiny_bert(vocab, 32, 2, 2, seed=4), tokenizer, folder / "bert_student"),
    }
    return paths


def micro_config(micro: dict, output_dir, teacher: str | None = "teacher", **sections) -> dict:
    """A causal-LM DistillConfig mapping on the micro setup; keyword sections replace or add sections."""
    mapping = {
        "student": {"model": str(micro["student"])},
        "data": {"train": str(micro["train"]), "eval": str(micro["eval"]), "max_length": 48},
        "loss": {"objective": "forward_kl", "temperature": 1.0, "alpha": 0.0},
        "train": {"output_dir": str(output_dir), "max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False,
                  "cpu": True, "eval_batches": 1, "max_grad_norm": None, "scheduler": "constant"},
    }
    if teacher is not None:
        mapping["teacher"] = {"model": str(micro[teacher])}
    for name, value in sections.items():
        mapping[name] = value
    return mapping


def classifier_config(micro: dict, output_dir, **sections) -> dict:
    return micro_config(
        micro, output_dir, teacher="bert_teacher", task="sequence_classification",
        student={"model": str(micro["bert_student"])},
        data={"train": str(micro["cls_train"]), "format": "classification", "max_length": 48},
        **sections,
    )


def first_batch(config_mapping: dict, setup) -> dict:
    """The first training batch of a config, collated as the loop does."""
    from alambic.config import DistillConfig
    from alambic.data import build_datasets, collate

    config = DistillConfig.model_validate(config_mapping)
    train, _ = build_datasets(config.data, setup.tokenizer, config.task, config.train.seed)
    indices = list(range(min(config.train.batch_size, len(train))))
    return collate([train[i] for i in indices], setup.tokenizer.pad_token_id, indices)


def build_setup(config_mapping: dict):
    from accelerate.utils import set_seed

    from alambic.config import DistillConfig
    from alambic.training.setup import build_models

    config = DistillConfig.model_validate(config_mapping)
    set_seed(config.train.seed)  # as run_distillation does, so auxiliary modules start the same
    return build_models(config, torch.device("cpu")), config
