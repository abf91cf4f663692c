"""Evaluate a teacher and any number of students side by side, with retention for each student.

The result is the `metrics.json` schema that `alambic report` renders:
{"task", "models": {name: {"role", "path", "metrics", "retention"}}, "confusion", "class_names", ...}.

    alambic eval runs/demo-bbc             # a demo run folder
    alambic eval teacher_dir --student student_dir --data test.jsonl --task sequence_classification
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alambic.config import ModelConfig
from alambic.errors import DataError
from alambic.evaluate import metrics as m
from alambic.evaluate.predict import causal_lm_scores, classifier_logits, lm_windows
from alambic.evaluate.speed import (
    classifier_batch_runner,
    count_parameters,
    disk_size_bytes,
    generation_runner,
    interleaved_seconds,
    interleaved_throughput,
    median_and_spread,
    peak_inference_memory_bytes,
    spread_warnings,
)
from alambic.models import load_model, load_tokenizer


@dataclass
class ModelSpec:
    name: str
    path: str
    role: str = "student"  # or "teacher"


def _load(spec: ModelSpec, task: str):
    config = ModelConfig(model=str(spec.path))
    model = load_model(config, task, role=spec.role).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, load_tokenizer(config, role=spec.role)


def _size_metrics(model, path: str) -> dict:
    folder = Path(path)
    return {
        "num_parameters": count_parameters(model),
        "disk_mb": disk_size_bytes(folder) / 2**20 if folder.is_dir() else None,
    }


def load_for_eval(spec: ModelSpec, task: str):
    """(frozen model in eval mode, its tokenizer)."""
    return _load(spec, task)


def add_retention(report: dict, teacher_name: str) -> None:
    _add_retention(report, teacher_name)


def _add_retention(report: dict, teacher_name: str) -> None:
    teacher_metrics = report["models"][teacher_name]["metrics"]
    for name, entry in report["models"].items():
        if name == teacher_name:
            continue
        entry["retention"] = {
            key: m.retention(value, teacher_metrics.get(key), key)
            for key, value in entry["metrics"].items()
            if key not in m.NOT_COMPARED
            and isinstance(value, (int, float)) and isinstance(teacher_metrics.get(key), (int, float))
        }


def _ordered(specs: list[ModelSpec]) -> list[ModelSpec]:
    teachers = [s for s in specs if s.role == "teacher"]
    if len(teachers) != 1:
        raise ValueError(f"exactly one teacher is needed, got {len(teachers)}")
    return teachers + [s for s in specs if s.role != "teacher"]


def evaluate_classifiers(
    specs: list[ModelSpec], rows: list[dict], max_length: int, class_names: list[str] | None = None,
    measure_speed: bool = True, show_progress: bool = True, speed_rounds: int = 9,
) -> dict:
    """Accuracy, macro-F1, agreement with the teacher, ECE, speed and size for each model on `rows`.

    Quality is measured one model at a time; speed afterwards, every model loaded
    and timed in interleaved rounds (`classifier_speeds`), so identical models
    measure alike whatever the machine's load did meanwhile.
    """
    if not rows:
        raise DataError("the evaluation set is empty", "give a file with at least one {text, label} record")
    texts = [str(r["text"]) for r in rows]
    labels = torch.tensor([int(r["label"]) for r in rows])
    report: dict = {"task": "sequence_classification", "num_examples": len(rows), "max_length": max_length,
                    "models": {}, "confusion": {}}
    teacher_predictions = None
    for spec in _ordered(specs):
        model, tokenizer = _load(spec, "sequence_classification")
        logits = classifier_logits(model, tokenizer, texts, max_length, description=f"eval {spec.name}",
                                   show_progress=show_progress)
        predictions = logits.argmax(-1)
        if teacher_predictions is None:
            teacher_predictions = predictions
        values = {
            "accuracy": m.accuracy(predictions, labels),
            "macro_f1": m.macro_f1(predictions, labels),
            "agreement": m.agreement(predictions, teacher_predictions),
            "ece": m.expected_calibration_error(logits.softmax(-1), labels),
            **_size_metrics(model, spec.path),
        }
        if measure_speed:  # tensor bytes of one batch-32 forward: deterministic, so measured here, model by model
            forward = classifier_batch_runner(model, tokenizer, texts, max_length, 32)
            values["peak_memory_mb"] = peak_inference_memory_bytes(model, forward) / 2**20
        num_classes = logits.shape[-1]
        report["confusion"][spec.name] = m.confusion_matrix(predictions, labels, num_classes)
        report["models"][spec.name] = {"role": spec.role, "path": str(spec.path), "metrics": values}
        del model
    report["class_names"] = class_names or [str(i) for i in range(num_classes)]
    if measure_speed:
        speeds, report["speed_warnings"] = classifier_speeds(specs, texts, max_length, speed_rounds)
        for name, values in speeds.items():
            report["models"][name]["metrics"].update(values)
    _add_retention(report, _ordered(specs)[0].name)
    return report


def classifier_speeds(specs: list[ModelSpec], texts: list[str], max_length: int, rounds: int = 9):
    """({name: throughput at batch 32, its spread, latency at batch 1}, warnings), all models interleaved."""
    import statistics

    loaded = {spec.name: _load(spec, "sequence_classification") for spec in _ordered(specs)}
    batch = {name: classifier_batch_runner(m_, t, texts, max_length, 32) for name, (m_, t) in loaded.items()}
    single = {name: classifier_batch_runner(m_, t, texts[:1], max_length, 1) for name, (m_, t) in loaded.items()}
    measured = interleaved_throughput(batch, 32, rounds=rounds)
    for name, seconds in interleaved_seconds(single, rounds=rounds).items():
        measured[name]["latency_ms"] = 1000 * statistics.median(seconds)
    return measured, spread_warnings(measured)


LM_SPEED_BATCHES = (1, 8)


def lm_speeds(loaded: dict[str, tuple], texts: list[str], new_tokens: int, rounds: int = 5):
    """({name: tokens/s and time to first token at batch 1 and 8, tokens/s spread}, warnings), models interleaved.

    The same interleaved rounds as the classifiers' (`interleaved_seconds`): every
    (model, batch, length) generation is one runner, so a change of machine load
    falls on every model alike. Decoding speed is the tokens of a `new_tokens`
    generation over its median time; time to first token is the median of a
    one-token generation. Tiny models' generation is jittery on a shared CPU
    (one model's back-to-back calls: 53-85 ms, benchmarks/RESULTS.md): the spread
    says so, and above 10% a warning does.
    """
    prompts = [t[:200] for t in texts[:8]]
    runners = {(name, batch, length): generation_runner(model, tokenizer, prompts, batch, length)
               for name, (model, tokenizer) in loaded.items()
               for batch in LM_SPEED_BATCHES for length in (1, new_tokens)}
    seconds = interleaved_seconds(runners, rounds=rounds)
    measured: dict[str, dict] = {name: {"speed_rounds": rounds} for name in loaded}
    for (name, batch, length), samples in seconds.items():
        median, spread = median_and_spread(samples)
        if length == 1:
            measured[name][f"ttft_ms_batch{batch}"] = 1000.0 * median
        if length == new_tokens:
            measured[name][f"tokens_per_s_batch{batch}"] = batch * new_tokens / median
            measured[name][f"tokens_per_s_spread_batch{batch}"] = spread
    warnings = [w for batch in LM_SPEED_BATCHES
                for w in spread_warnings(measured, spread_key=f"tokens_per_s_spread_batch{batch}",
                                         rounds_key="speed_rounds", what=f"batch-{batch} generation")]
    return measured, warnings


def evaluate_causal_lms(
    specs: list[ModelSpec], texts: list[str], max_length: int, measure_speed: bool = True,
    new_tokens: int = 32, show_progress: bool = True, speed_rounds: int = 5,
) -> dict:
    """Held-out perplexity, bits per byte, KL to the teacher and top-1 agreement, speed and size.

    Quality and peak memory are measured one model at a time; generation speed
    afterwards, in interleaved rounds over every model (`lm_speeds`), so with
    speed on every model stays loaded until the end.
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("the held-out text is empty", "give a file with at least one non-empty text record")
    ordered = _ordered(specs)
    teacher, teacher_tokenizer = _load(ordered[0], "causal_lm")
    report: dict = {"task": "causal_lm", "num_documents": len(texts), "max_length": max_length, "models": {}}
    loaded: dict[str, tuple] = {}
    for spec in ordered:
        model, tokenizer = (teacher, teacher_tokenizer) if spec is ordered[0] else _load(spec, "causal_lm")
        windows = lm_windows(tokenizer, texts, max_length)
        same_vocab = tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
        scores = causal_lm_scores(model, windows, teacher if same_vocab and model is not teacher else None,
                                  description=f"eval {spec.name}", show_progress=show_progress)
        values = {
            "perplexity": m.perplexity(scores["nll"], scores["tokens"]),
            "bits_per_byte": m.bits_per_byte(scores["nll"], scores["bytes"]),
            "eval_tokens": scores["tokens"],
            **_size_metrics(model, spec.path),
        }
        if model is not teacher and same_vocab:
            values["kl_to_teacher"] = scores["kl"] / scores["tokens"]
            values["top1_agreement"] = scores["top1"] / scores["tokens"]
        if measure_speed:  # tensor bytes of one forward: deterministic, so measured here, model by model
            batch = torch.tensor([w for w in windows.inputs if len(w) == len(windows.inputs[0])][:8],
                                 device=next(model.parameters()).device)
            values["peak_memory_mb"] = peak_inference_memory_bytes(model, lambda: model(input_ids=batch)) / 2**20
            loaded[spec.name] = (model, tokenizer)
        report["models"][spec.name] = {"role": spec.role, "path": str(spec.path), "metrics": values}
    if measure_speed:
        speeds, report["speed_warnings"] = lm_speeds(loaded, texts, new_tokens, speed_rounds)
        for name, values in speeds.items():
            report["models"][name]["metrics"].update(values)
    _add_retention(report, ordered[0].name)
    return report
