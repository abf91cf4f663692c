"""Progressive distillation: a chain teacher -> intermediate -> ... -> student, one normal run per stage.

Each stage is a plain `run_distillation` whose teacher is the previous stage's
exported student (the first stage's is `teacher`). A stage's student is a model
folder, layers kept from its teacher (`student.from_teacher`), or a fresh model
of a smaller shape (`architecture`: keys of the teacher's model config to
change, e.g. hidden_size). The folder holds stage-1/, stage-2/, ... (each a
normal run folder) and summary.json: every stage evaluated on the held-out data
against its own teacher and against the first teacher.

Finished stages whose config has not changed are reused, so an interrupted
chain continues where it stopped (an unfinished stage resumes from its last
checkpoint when it saves any).

    alambic progressive configs/progressive.yaml
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, ValidationError, model_validator

from alambic.config import DistillConfig, StudentConfig, Strict, TeacherConfig, apply_overrides, format_validation_error
from alambic.config_overrides import flatten_dotted
from alambic.durable import atomic_dir, atomic_write_text
from alambic.errors import ConfigError

RESERVED_RUN_KEYS = ("teacher", "student", "teachers")


class StageConfig(Strict):
    name: str | None = None
    student: StudentConfig | None = Field(None, description="a model folder / hub id, or from_teacher layer selection")
    architecture: dict[str, Any] | None = Field(
        None, description="a fresh model: the teacher's model config with these keys changed (e.g. hidden_size)"
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys for this stage, e.g. train.max_steps")

    @model_validator(mode="after")
    def _one_student(self) -> "StageConfig":
        if (self.student is None) == (self.architecture is None):
            raise ValueError("a stage needs exactly one of `student` (model or from_teacher) and `architecture`")
        return self


class ProgressiveConfig(Strict):
    """The chain: the first teacher, the shared run settings, and one entry per stage."""

    output_dir: str = "runs/progressive"
    teacher: TeacherConfig
    run: dict[str, Any] = Field(description="a distill config without teacher/student: data, loss, train, ...")
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _valid_chain(self) -> "ProgressiveConfig":
        if self.teacher.model is None:
            raise ValueError("progressive distillation runs its teachers: set teacher.model (a logit cache cannot chain)")
        reserved = [key for key in RESERVED_RUN_KEYS if key in self.run]
        if reserved:
            raise ValueError(f"run.{reserved[0]} is set by the chain (first teacher, then each stage's student)")
        stage_configs(self)  # every stage's run config must validate before anything trains
        return self


def stage_folder(config: ProgressiveConfig, index: int) -> Path:
    return Path(config.output_dir) / f"stage-{index + 1}"


def init_folder(config: ProgressiveConfig, index: int) -> Path:
    return Path(config.output_dir) / f"init-stage-{index + 1}"


def stage_configs(config: ProgressiveConfig) -> list[DistillConfig]:
    """The DistillConfig of every stage; stage k's teacher is stage k-1's exported student."""
    stages = []
    teacher = config.teacher.model_dump(mode="json", exclude_none=True)
    for index, stage in enumerate(config.stages):
        raw = json.loads(json.dumps(config.run))
        raw.setdefault("train", {})["output_dir"] = str(stage_folder(config, index))
        for key, value in flatten_dotted(stage.overrides):  # nested keys too: stages.N.overrides.train.lr=...
            apply_overrides(raw, [f"{key}={json.dumps(value)}"])
        raw["teacher"] = teacher
        if stage.architecture is not None:
            raw["student"] = {"model": str(init_folder(config, index))}
        else:
            raw["student"] = stage.student.model_dump(mode="json", exclude_none=True)
        try:
            stages.append(DistillConfig.model_validate(raw))
        except ValidationError as err:
            problems = format_validation_error(err, DistillConfig, "").splitlines()[1:]
            detail = "; ".join(line.strip(" -") for line in problems)
            raise ValueError(f"stage {index + 1} (run settings + its overrides, keys relative to `run`): {detail}") from None
        teacher = {"model": str(stage_folder(config, index) / "final"), "dtype": config.teacher.dtype}
    return stages


def build_fresh_student(teacher_folder: str, architecture: dict, task: str, seed: int, target: Path) -> Path:
    """A randomly initialised model shaped like the teacher with `architecture` changed, saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_config = AutoConfig.from_pretrained(teacher_folder)
    unknown = [key for key in architecture if not hasattr(model_config, key)]
    if unknown:
        raise ConfigError(
            f"architecture key {unknown[0]!r} is not a setting of the teacher's {model_config.model_type} config",
            "use keys of its config.json, e.g. num_hidden_layers, hidden_size, intermediate_size",
        )
    settings = {**model_config.to_dict(), **architecture}
    if "head_dim" not in architecture and {"hidden_size", "num_attention_heads"} & set(architecture):
        settings.pop("head_dim", None)  # derived from the new width and head count
    model_config = type(model_config)(**settings)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    model = auto.from_config(model_config)
    with atomic_dir(target) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher_folder).save_pretrained(temporary)
    return target


def _finished_with(config: DistillConfig) -> bool:
    """The stage already ran to the end with this very config."""
    from alambic.training.run_dir import _comparable

    folder = Path(config.train.output_dir)
    if not (folder / "final").exists() or not (folder / "config.yaml").exists():
        return False
    saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return _comparable(saved) == _comparable(config.model_dump(mode="json", by_alias=True))


def _evaluate_against(spec, teacher_model, config: DistillConfig, device) -> dict:
    """Held-out CE (and, with a teacher, KL / top-1 agreement) of the model `spec` names."""
    from alambic.data import build_datasets
    from alambic.models import load_model, load_tokenizer
    from alambic.teachers.live import LiveTeacher
    from alambic.evaluate.heldout import evaluate
    from alambic.models.module import StudentModule

    tokenizer = load_tokenizer(spec, role="student")
    _, eval_data = build_datasets(config.data, tokenizer, config.task, config.train.seed)
    model = load_model(spec, config.task, role="student")
    metrics = {"parameters": sum(p.numel() for p in model.parameters()),
               "layers": getattr(model.config, "num_hidden_layers", None)}
    if eval_data is None:
        return metrics
    vocab = len(tokenizer) if config.task == "causal_lm" else None
    teacher = LiveTeacher(teacher_model, vocab) if teacher_model is not None else None
    metrics.update(evaluate(StudentModule(model, vocab).to(device), teacher, eval_data, config.task,
                            tokenizer.pad_token_id, config.train.batch_size, device, config.train.eval_batches))
    return metrics


def _device(config: DistillConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not config.train.cpu else "cpu")


def run_progressive(config: ProgressiveConfig, overwrite: bool = False) -> dict:
    """Train every stage in order (reusing finished ones), evaluate each, write summary.json."""
    from alambic.config import ModelConfig
    from alambic.models import freeze, load_model
    from alambic.training.loop import run_distillation

    folder = Path(config.output_dir)
    plans = stage_configs(config)
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "progressive.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    device = _device(plans[0])
    first_teacher = freeze(load_model(config.teacher, plans[0].task, role="teacher")).to(device)
    summary = {"teacher": {"model": config.teacher.model, "eval": _evaluate_against(config.teacher, None, plans[0], device)},
               "stages": []}
    teacher_changed = False  # a retrained stage invalidates every stage after it
    for index, (stage, plan) in enumerate(zip(config.stages, plans)):
        status = "reused" if _finished_with(plan) and not teacher_changed else "trained"
        if status == "trained":
            if stage.architecture is not None:
                build_fresh_student(plan.teacher.model, stage.architecture, plan.task, plan.train.seed,
                                    init_folder(config, index))
            run_distillation(plan, overwrite=teacher_changed)
            teacher_changed = True
        final = ModelConfig(model=str(stage_folder(config, index) / "final"))
        own_teacher = first_teacher if index == 0 else freeze(load_model(plan.teacher, plan.task, role="teacher")).to(device)
        entry = {
            "stage": index + 1, "name": stage.name or f"stage-{index + 1}", "folder": str(stage_folder(config, index)),
            "teacher": plan.teacher.model, "status": status,
            "eval": _evaluate_against(final, own_teacher, plan, device),
        }
        if index > 0:
            against_first = _evaluate_against(final, first_teacher, plan, device)
            entry["eval_vs_first_teacher"] = {k: v for k, v in against_first.items() if k in ("eval_kl", "eval_agreement")}
        summary["stages"].append(entry)
        atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2))
    return summary
