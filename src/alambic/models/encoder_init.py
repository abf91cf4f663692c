"""`alambic init-student` for encoder classifiers (task: sequence_classification).

The student is built from a BERT-family classifier teacher and stays a classifier: the
pooler and the classification head are kept (sliced when the width shrinks), so with
every layer kept and nothing pruned its logits equal the teacher's. Steps, in order:

1. depth: keep some layers (`method: select`) or average adjacent ones (`method: average`);
2. width (`method: prune`): drop the least important heads / MLP channels / hidden
   channels, ranked on the calibration text (models/encoder_width.py; BERT only);
3. vocabulary (`vocab:` section): keep the tokens the domain texts use, remap the
   tokenizer and the embedding rows (models/vocab_trim.py; WordPiece only).

Anything else (a decoder given as a classifier teacher, an encoder that is not BERT for
width or vocabulary changes) is refused with a clear error before anything is written.

    alambic init-student configs/init_student_classifier.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alambic.errors import ConfigError, ModelError

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta", "deberta-v2",
                 "mpnet", "camembert")


def teacher_kind(model_path: str | None) -> tuple[str | None, list[str]]:
    """(model_type, architectures) from a local teacher folder's config.json, or (None, []) when unknown."""
    if model_path is None:
        return None, []
    path = Path(model_path).expanduser() / "config.json"
    if not path.exists():
        return None, []
    data = json.loads(path.read_text())
    return data.get("model_type"), list(data.get("architectures") or [])


def refuse_mismatched_task(task: str, model_path: str | None) -> None:
    """Never load an encoder classifier as a causal LM (its head and pooler would be dropped silently)."""
    kind, architectures = teacher_kind(model_path)
    classifier = any("ForSequenceClassification" in name for name in architectures)
    if task == "causal_lm" and (classifier or kind in ENCODER_TYPES):
        raise ModelError(
            f"the teacher {model_path!r} is an encoder{' classifier' if classifier else ''} "
            f"({', '.join(architectures) or kind}), not a causal LM",
            "set task: sequence_classification in the init-student config",
        )
    if task == "sequence_classification" and kind is not None and kind not in ENCODER_TYPES:
        raise ModelError(
            f"init-student for classifiers supports BERT-family encoders; the teacher {model_path!r} is a "
            f"{kind} ({', '.join(architectures) or 'unknown architecture'})",
            "use a BERT-family classifier teacher, or task: causal_lm for a decoder",
        )


def _texts(path: str, column: str, count: int | None) -> list[str]:
    from alambic.data import read_records

    if not Path(path).exists():
        raise ConfigError(f"text file {path!r} does not exist", "check data.calibration / vocab.texts in the config")
    records = read_records(path, count)
    missing = [i for i, r in enumerate(records) if column not in r]
    if missing:
        raise ConfigError(f"{path}: record {missing[0]} has no column {column!r}", "set data.text_column")
    return [str(r[column]) for r in records]


def _batches(tokenizer, texts: list[str], max_length: int, batch_size: int, device):
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
        yield {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}


def _depth(teacher, config):
    from alambic.models.averaging import average_layers, layer_groups
    from alambic.models.student import find_layer_list, layer_indices_for, select_layers

    total = len(find_layer_list(teacher)[2])
    if config.method == "average":
        return average_layers(teacher, layer_groups(total, config.num_layers, config.every_k))
    strategy = list(range(total)) if config.layers == "all" else config.layers
    return select_layers(teacher, layer_indices_for(total, config.num_layers, strategy, config.every_k))


def build_encoder_student(teacher, tokenizer, config, calibration: list[str], vocab_texts: list[str] | None, device):
    """(student, student tokenizer, kept vocabulary ids or None); `teacher` is untouched."""
    from alambic.models.encoder_width import check_bert, encoder_importance, plan_encoder_width, prune_encoder_width
    from alambic.models.vocab_trim import check_wordpiece, trim_vocabulary

    if config.method == "prune":
        check_bert(teacher)  # refuse before any work
    if vocab_texts is not None:
        check_wordpiece(tokenizer)
    student = _depth(teacher, config)
    if config.method == "prune":
        width = config.width
        batches = _batches(tokenizer, calibration, config.data.max_length, config.data.batch_size, device)
        importance = encoder_importance(student, batches)
        plan = plan_encoder_width(student, importance, width.heads_keep, width.mlp_keep, width.hidden_keep)
        student = prune_encoder_width(student, plan)
    kept = None
    student_tokenizer = tokenizer
    if vocab_texts is not None:
        vocab = config.vocab
        student, student_tokenizer, kept = trim_vocabulary(student, tokenizer, vocab_texts, config.data.max_length,
                                                           vocab.min_count, vocab.keep_ascii_characters)
        student.config.alambic_vocab_kept = len(kept)
    return student.eval(), student_tokenizer, kept


@torch.no_grad()
def _logits(model, tokenizer, texts, config, device) -> torch.Tensor:
    chunks = [model(**batch).logits.float().cpu()
              for batch in _batches(tokenizer, texts, config.data.max_length, config.data.batch_size, device)]
    return torch.cat(chunks)


def _describe(model, logits: torch.Tensor, reference: torch.Tensor | None, tokenizer) -> dict:
    from alambic.evaluate.speed import count_parameters

    cfg = model.config
    row = {"layers": cfg.num_hidden_layers, "attention_heads": cfg.num_attention_heads,
           "intermediate_size": cfg.intermediate_size, "hidden_size": cfg.hidden_size, "vocab_size": len(tokenizer),
           "parameters": count_parameters(model)}
    if reference is not None:
        teacher_logprobs = reference.log_softmax(-1)
        row["kl"] = float((teacher_logprobs.exp() * (teacher_logprobs - logits.log_softmax(-1))).sum(-1).mean())
        row["agreement"] = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return row


def init_encoder_student(config, overwrite: bool = False) -> dict:
    """Build, save (atomically) and describe an encoder classifier student; returns the report."""
    from alambic.durable import atomic_dir, atomic_write_json
    from alambic.models import freeze, load_model, load_tokenizer
    from alambic.models.vocab_trim import write_vocab_map

    refuse_mismatched_task("sequence_classification", config.teacher.model)
    output = Path(config.output_dir)
    if output.exists() and not overwrite:
        raise ConfigError(f"output_dir {str(output)!r} already exists", "pass --overwrite or choose another output_dir")
    data = config.data
    calibration = _texts(data.calibration, data.text_column, data.calibration_samples)
    evaluation = _texts(data.eval, data.text_column, data.eval_samples) if data.eval else calibration[: data.eval_samples]
    vocab_texts = None
    if config.vocab is not None:
        vocab_texts = [t for path in (config.vocab.texts or [data.calibration]) for t in _texts(path, data.text_column, None)]
    device = torch.device("cpu") if config.device == "cpu" or not torch.cuda.is_available() else torch.device("cuda")
    tokenizer = load_tokenizer(config.teacher, role="teacher")
    teacher = freeze(load_model(config.teacher, "sequence_classification", role="teacher")).to(device)
    student, student_tokenizer, kept = build_encoder_student(teacher, tokenizer, config, calibration, vocab_texts, device)
    teacher_logits = _logits(teacher, tokenizer, evaluation, config, device)
    report = {"method": config.method, "task": "sequence_classification", "output_dir": str(output),
              "teacher_model": config.teacher.model,
              "teacher": _describe(teacher, teacher_logits, None, tokenizer),
              "student": _describe(student, _logits(student, student_tokenizer, evaluation, config, device),
                                   teacher_logits, student_tokenizer),
              "eval": {"source": data.eval or data.calibration, "rows": len(evaluation)}}
    report["student"]["kept_layers"] = getattr(student.config, "alambic_selected_layers", None)
    report["student"]["parameter_ratio"] = report["student"]["parameters"] / report["teacher"]["parameters"]
    if kept is not None:
        report["vocab"] = {"kept": len(kept), "of": len(tokenizer), "texts": len(vocab_texts)}
    with atomic_dir(output) as temporary:
        student.save_pretrained(temporary, safe_serialization=True)
        student_tokenizer.save_pretrained(temporary)
        if kept is not None:  # a live teacher translates the student's ids back (teachers/vocab_map.py)
            write_vocab_map(temporary, kept, len(tokenizer))
        atomic_write_json(temporary / "init_report.json", report)
    return report


def print_encoder_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"init-student ({report['method']}, classifier) -> {report['output_dir']}")
    for column in ("model", "layers", "heads", "mlp", "hidden", "vocab", "params", "agreement", "KL"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in ("teacher", "student"):
        row = report[name]
        table.add_row(name, str(row["layers"]), str(row["attention_heads"]), str(row["intermediate_size"]),
                      str(row["hidden_size"]), f"{row['vocab_size']:,}", f"{row['parameters']:,}",
                      f"{row['agreement']:.1%}" if "agreement" in row else "-", f"{row['kl']:.4f}" if "kl" in row else "-")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    student = report["student"]
    console.print(f"student: {student['parameter_ratio']:.2f}x the teacher's parameters; agreement and KL(teacher || "
                  f"student) on {report['eval']['rows']} texts, before any training")
