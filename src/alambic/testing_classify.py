"""The tiny classification setup: a labelled pool, an unlabelled transfer set and a small BERT teacher.

Built in code from the Python standard library's source, nothing downloaded: each
text is a chunk of one of three stdlib modules and its class is the module. A
WordPiece tokenizer (BERT-style) is trained on the chunks and a 2-layer BERT
classifier teacher is fine-tuned on the labelled pool through the training loop.
`python -m alambic.testing runs/tiny` builds it in `runs/tiny/classify` (the
configs/classify_transfer.yaml and configs/init_student_classifier.yaml recipes use it).

    python -c "from alambic.testing_classify import build_tiny_classifier as b; print(b('/tmp/tiny_cls'))"
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from alambic.data.stdlib_corpus import stdlib_module_texts

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(texts: list[str], vocab_size: int = 600):
    """A lowercasing BERT-style WordPiece tokenizer trained on `texts` (a transformers fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_bert_classifier(vocab_size: int, num_labels: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                         seed: int = 0, pad_token_id: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=hidden * 2, max_position_embeddings=256, num_labels=num_labels,
                        pad_token_id=pad_token_id)
    return BertForSequenceClassification(config)


def _write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def build_tiny_classifier(folder: Path, classes: int = 3, chars: int = 300, teacher_steps: int = 80, seed: int = 0,
                          progress: bool = False) -> dict:
    """labelled.jsonl (20%), transfer.jsonl (60%, text only), test.jsonl (20%), and a trained BERT teacher."""
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules, _ = stdlib_module_texts(classes, 0, seed)
    rows = [{"text": " ".join(module[i : i + chars].split()), "label": label}
            for label, module in enumerate(modules) for i in range(0, min(len(module), 60 * chars), chars)]
    rows = [row for row in rows if row["text"]]
    random.Random(seed).shuffle(rows)
    n = len(rows)
    labelled, transfer, test = rows[: n // 5], rows[n // 5 : 4 * n // 5], rows[4 * n // 5 :]
    paths = {"labelled": _write(labelled, folder / "labelled.jsonl"),
             "transfer": _write([{"text": r["text"]} for r in transfer], folder / "transfer.jsonl"),
             "test": _write(test, folder / "test.jsonl")}
    tokenizer = wordpiece_tokenizer([r["text"] for r in rows])
    init = folder / "teacher_init"
    tiny_bert_classifier(len(tokenizer), classes, seed=seed, pad_token_id=tokenizer.pad_token_id).save_pretrained(init)
    tokenizer.save_pretrained(init)
    config = DistillConfig.model_validate({
        "task": "sequence_classification", "student": {"model": str(init), "num_labels": classes},
        "data": {"train": str(paths["labelled"]), "eval": str(paths["test"]), "format": "classification",
                 "max_length": 96},
        "loss": {"alpha": 1.0},
        "train": {"output_dir": str(folder / "teacher_run"), "max_steps": teacher_steps, "batch_size": 16, "lr": 2e-3,
                  "warmup_steps": 5, "seed": seed, "progress": progress, "cpu": True},
    })
    result = run_distillation(config, overwrite=True)
    return {**paths, "teacher": result.output_dir / "final", "teacher_metrics": result.final_metrics}
