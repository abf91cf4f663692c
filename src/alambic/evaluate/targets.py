"""What `alambic eval TARGET` evaluates: the models, the data and the task behind a config, run or model folder.

- a demo run folder (metrics.json naming its models and eval data): the same models on the same data again;
- a distill run folder (config.yaml + final/) or a distill YAML config: the teacher and the trained student;
- a model folder (config.json): that model as the reference, students from --student, data from --data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from alambic.config import DistillConfig, load_config
from alambic.errors import ConfigError, DataError
from alambic.evaluate.suite import ModelSpec


@dataclass
class EvalPlan:
    task: str
    specs: list[ModelSpec]
    data: str | None
    max_length: int
    text_column: str = "text"
    label_column: str = "label"
    output_dir: Path = Path("runs/eval")
    extra: dict = field(default_factory=dict)  # carried into metrics.json (class names, title)


def _task_of_model_folder(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    architectures = " ".join(config.get("architectures") or [])
    return "sequence_classification" if "SequenceClassification" in architectures else "causal_lm"


def _from_saved_metrics(folder: Path, saved: dict) -> EvalPlan:
    specs = [ModelSpec(name, entry["path"], entry["role"]) for name, entry in saved["models"].items()]
    return EvalPlan(saved["task"], specs, saved.get("eval_data"), saved.get("max_length", 512),
                    output_dir=folder / "eval",
                    extra={k: saved[k] for k in ("class_names", "title", "baseline") if k in saved})


def _from_distill_config(config: DistillConfig, run_folder: Path, source: str) -> EvalPlan:
    student = run_folder / "final"
    if not student.is_dir():
        raise DataError(
            f"{source}: the run has no trained student at {student}",
            "train it first with `alambic distill CONFIG`, or pass a model folder and --student",
        )
    specs = [ModelSpec("student", str(student), "student")]
    if config.teacher is not None and config.teacher.model is not None:
        specs.insert(0, ModelSpec("teacher", config.teacher.model, "teacher"))
    else:  # a supervised run: the student is its own reference
        specs[0].role = "teacher"
    data = config.data
    return EvalPlan(config.task, specs, data.eval, data.max_length, data.text_column, data.label_column,
                    output_dir=run_folder / "eval")


def resolve_target(target: str) -> EvalPlan:
    path = Path(target)
    if not path.exists():
        raise ConfigError(
            f"{target!r} does not exist",
            "give a distill config (.yaml), a run folder, or a model folder (with config.json)",
        )
    if path.is_file():
        config = load_config(path, [], DistillConfig)
        return _from_distill_config(config, Path(config.train.output_dir), target)
    if (path / "metrics.json").exists():
        saved = json.loads((path / "metrics.json").read_text())
        if saved.get("models") and all("path" in e for e in saved["models"].values()):
            return _from_saved_metrics(path, saved)
    if (path / "config.yaml").exists() and (path / "final").exists():
        return _from_distill_config(load_config(path / "config.yaml", [], DistillConfig), path, target)
    if (path / "config.json").exists():
        return EvalPlan(_task_of_model_folder(path), [ModelSpec("teacher", str(path), "teacher")], None, 512,
                        output_dir=Path("runs") / f"eval-{path.resolve().name}")
    raise ConfigError(
        f"{target!r} is neither a run folder, a config, nor a model folder",
        "give a distill config (.yaml), a run folder (config.yaml + final/ or metrics.json) or a model folder",
    )


def _display_name(path: str, taken: set[str]) -> str:
    """A run's exported model is `RUN/final`: the run's name says more than "final"."""
    folder = Path(path)
    base = folder.parent.name if folder.name == "final" and folder.parent.name else folder.name
    name, index = base, 2
    while name in taken:
        name, index = f"{base}-{index}", index + 1
    return name


def apply_options(plan: EvalPlan, students: list[str], data: str | None, task: str | None,
                  max_length: int | None, output_dir: str | None) -> EvalPlan:
    for student in students:
        plan.specs.append(ModelSpec(_display_name(student, {s.name for s in plan.specs}), student, "student"))
    plan.data = data or plan.data
    plan.task = task or plan.task
    plan.max_length = max_length or plan.max_length
    if output_dir:
        plan.output_dir = Path(output_dir)
    if plan.data is None:
        raise DataError("no evaluation data: the target names none", "pass --data FILE (jsonl, csv, parquet)")
    return plan


def add_baseline(plan: EvalPlan, baseline: str | None) -> str | None:
    """The name of the baseline student: --baseline (a folder, added as a student, or a model's name), or the one
    a demo run folder names."""
    if baseline is None:
        return plan.extra.pop("baseline", None)
    names = {spec.name for spec in plan.specs}
    if baseline in names:
        return baseline
    if not Path(baseline).is_dir():
        raise ConfigError(f"--baseline {baseline!r} is neither a model folder nor an evaluated model "
                          f"({', '.join(sorted(names))})", "give the baseline student's folder")
    name = _display_name(baseline, names)
    plan.specs.append(ModelSpec(name, baseline, "student"))
    return name
