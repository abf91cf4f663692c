"""The run configuration: pydantic models validated before anything runs.

A config is one YAML file; `key.sub=value` overrides from the command line are
applied to the raw mapping before validation, so they are checked the same way.
Unknown keys are errors that name the key and suggest the closest valid one.

    alambic validate configs/tiny_kd.yaml loss.temperature=2
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator, model_validator

from alambic.config_base import Strict  # noqa: F401  (every command's schema imports it from here)
from alambic.config_extras import InterchangeConfig, QuantizationConfig
from alambic.config_modes import (
    CoDistillConfig,
    CrossTokenizerConfig,
    EnsembleConfig,
    RepresentationConfig,
    RolloutConfig,
    SelfDistillConfig,
)
from alambic.config_scale import FSDPConfig, Strategy
from alambic.config_served import ServedTeacherOptions
from alambic.errors import ConfigError
from alambic.objective_names import OBJECTIVES

DType = Literal["auto", "float32", "bfloat16", "float16"]
Task = Literal["causal_lm", "sequence_classification"]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # Adam's betas: in [0, 1)


def known_objective(value: str) -> str:
    """A pydantic validator body: the objective must be one alambic implements."""
    if value not in OBJECTIVES:
        close = difflib.get_close_matches(value, OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown objective {value!r}{hint}; choose one of {', '.join(OBJECTIVES)}")
    return value


Objective = Annotated[str, AfterValidator(known_objective)]


class ModelConfig(Strict):
    model: str | None = Field(None, description="hub id or local folder")
    revision: str | None = None
    dtype: DType = "float32"
    trust_remote_code: bool = False
    num_labels: int | None = Field(None, ge=2, description="classes, for sequence classification")
    allow_pickle_weights: bool = Field(False, description="load a folder that has only pickle weights (.bin)")


class TeacherConfig(ModelConfig):
    cache: str | None = Field(None, description="folder of an offline top-k logit cache; no model is loaded")
    weight: float = Field(1.0, ge=0.0, description="weight of this teacher when several are combined")
    name: str | None = None
    server: str | None = Field(None, description="OpenAI-compatible URL of a served teacher (vLLM prompt_logprobs)")
    server_model: str | None = Field(None, description="the model name the server must list (served teacher)")
    top_k: int | None = Field(None, ge=1, description="log-probabilities per position from the server")
    served: ServedTeacherOptions | None = Field(None, description="requests, prefetch, retries of teacher.server")

    @model_validator(mode="after")
    def _model_or_cache(self) -> "TeacherConfig":
        if self.model is None and self.cache is None and self.server is None:
            raise ValueError(
                "a teacher needs `model` (hub id or folder), `cache` (a logit cache folder) or `server` (a URL)"
            )
        if self.server is not None or self.served is not None:
            from alambic.teachers.served_checks import check_server_fields

            check_server_fields(self)
        return self


class StudentInit(Strict):
    """Build the student from the teacher instead of loading it."""

    layers: list[int] | Literal["uniform", "every_k"] = "uniform"
    num_layers: int | None = Field(None, ge=1)
    every_k: int | None = Field(None, ge=1)


class StudentConfig(ModelConfig):
    from_teacher: StudentInit | None = None

    @model_validator(mode="after")
    def _model_or_init(self) -> "StudentConfig":
        if self.model is None and self.from_teacher is None:
            raise ValueError("the student needs `model` (hub id or folder) or `from_teacher`")
        return self


class DataConfig(Strict):
    train: str
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held out from train when eval is not given")
    format: Literal["text", "prompt_completion", "messages", "classification"] = "text"
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    label_column: str = "label"
    max_length: int = Field(512, ge=8)
    packing: bool = False
    train_on_prompt: bool = Field(False, description="also compute the loss on prompt / non-assistant tokens")
    limit: int | None = Field(None, ge=1, description="use only the first N records")
    weight_column: str | None = Field(None, description="per-record loss weight (e.g. multi-task mixing)")
    unlabelled: str | None = Field(None, description="a second file of rows without gold labels (a transfer set): "
                                   "the teacher's targets alone teach them (data/transfer.py)")
    labelled_repeat: int = Field(1, ge=1, description="times the labelled pool (data.train) is repeated in each epoch")
    logprobs_column: str | None = Field(
        None, description="prompt_completion: per-token teacher logprobs (alambic generate's completion_logprobs) "
        "used as soft targets when there is no teacher section",
    )


class LossConfig(Strict):
    objective: str = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the hard-label CE (Hinton's alpha)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="generalized JSD interpolation")
    skew_alpha: float = Field(0.1, gt=0.0, lt=1.0, description="skew KL mixing weight (DistiLLM), in (0, 1)")
    top_k: int | None = Field(None, ge=1, description="restrict the teacher distribution to its top-k tokens")
    teacher_targets: Literal["soft", "hard"] = Field(
        "soft", description="soft: the teacher's distribution (KD); hard: its argmax as a label (losses/targets.py)")
    fused: bool = Field(True, description="chunked LM-head loss for causal LMs (never materialises N x V logits)")
    chunk_size: int = Field(1024, ge=1)
    logit_softcap: float | None = Field(
        None, gt=0.0, description="cap both logit tensors inside the loss, c * tanh(z / c) (Gemma 2 uses 30)"
    )

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        return known_objective(value)


class TrainConfig(Strict):
    output_dir: str = "runs/distill"
    seed: int = 0
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per device per micro-batch")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = Field(False, description="force CPU (also for `accelerate launch` with several CPU processes)")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at the end")
    eval_batches: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = none")
    keep_last: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    progress: bool = True
    strategy: Strategy = Field("ddp", description="ddp: a full replica per process; fsdp: sharded (docs/scale.md)")
    fsdp: FSDPConfig = FSDPConfig()
    nonfinite_skips: int = Field(
        0, ge=0, description="steps with a non-finite loss or gradient skipped before the run stops (exit 3)"
    )

    @field_validator("trackers")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        from alambic.config_overrides import check_trackers_installed

        return check_trackers_installed(value)


class DistillConfig(Strict):
    """A whole run: which teacher signal, which student, which data, which loss."""

    task: Task = "causal_lm"
    teacher: TeacherConfig | None = None
    student: StudentConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    # Modes (alambic.training.modes): all optional, default = off-policy logit KD.
    teachers: list[TeacherConfig] = Field(default_factory=list, description="several teachers, combined by `ensemble`")
    ensemble: EnsembleConfig | None = None
    rollout: RolloutConfig = RolloutConfig()
    representation: RepresentationConfig | None = None
    self_distill: SelfDistillConfig | None = None
    co_distill: CoDistillConfig | None = None
    cross_tokenizer: CrossTokenizerConfig | None = None
    interchange: InterchangeConfig | None = None  # counterfactual (interchange-intervention) distillation
    quantization: QuantizationConfig | None = None  # quantization-aware distillation + compressed-tensors export

    @model_validator(mode="after")
    def _consistent(self) -> "DistillConfig":
        if self.task == "sequence_classification" and self.data.format != "classification":
            raise ValueError("task 'sequence_classification' needs data.format: classification")
        if self.data.format == "classification" and self.task != "sequence_classification":
            raise ValueError("data.format 'classification' needs task: sequence_classification")
        if self.student.from_teacher is not None and (self.teacher is None or self.teacher.model is None):
            raise ValueError("student.from_teacher needs teacher.model")
        return self


# ----------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=1` -> (['a', 'b'], 1); values are parsed as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value",
                "write dotted keys, e.g. train.lr=3e-4 loss.temperature=2",
            )
        key, raw = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(
                f"override {item!r} has no key (or an empty part in it) before '='",
                "write dotted keys, e.g. train.lr=3e-4 loss.temperature=2",
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw  # YAML 1.1 reads no/yes/on/off as booleans: mixed_precision=no means 'no'
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted key; a number indexes a list (`stages.1.overrides.train.max_steps=3`)."""
    from alambic.config_overrides import set_dotted

    for path, value in parse_overrides(overrides):
        set_dotted(raw, path, value)
    return raw


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the section that `loc` points into."""
    current: Any = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            for c in candidates:
                nested += [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return list(getattr(current, "model_fields", {}))


def format_validation_error(error: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _fields_at(model_cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            suggestion = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"  - unknown key {dotted!r}{suggestion} (valid here: {', '.join(valid)})")
        elif item["type"] == "missing":
            lines.append(f"  - {dotted}: required key is missing")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  - {dotted}: {item['msg']}{shown}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist", "check the path, e.g. configs/tiny_kd.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config {str(path)!r} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r})",
            "save the config as UTF-8 YAML (a binary or latin-1 file cannot be read)",
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config {str(path)!r}: {err.strerror}", "check the file's permissions")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {err}", "fix the YAML syntax at the position shown")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def validate_mapping(raw: dict, model_cls: type[BaseModel], source: str) -> BaseModel:
    try:
        return model_cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls, source), "edit the config or the key=value override") from None


def load_config(path: str | Path, overrides: list[str] | None = None, model_cls: type[BaseModel] = DistillConfig):
    """Read YAML, apply dotted overrides, validate into `model_cls`."""
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    return validate_mapping(raw, model_cls, str(path))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, with credentials inside URLs masked (it is printed and saved).

    Keys are written as configs spell them (`rollout.lambda`, not the Python name `lambda_`),
    so a saved config.yaml can be given back to any command as it is.
    """
    from alambic.redact import redact_tree

    return yaml.safe_dump(redact_tree(config.model_dump(mode="json", by_alias=True)), sort_keys=False)


def config_model_for(path: str | Path) -> type[BaseModel]:
    """The schema a YAML file declares with a `# schema: module:Class` comment (default DistillConfig).

    Commands other than `distill` (generate, cache-logits, ...) have their own
    config models; the comment lets `alambic validate` and the config tests
    check every file in configs/ against the right one.
    """
    import importlib

    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[:20]:
        stripped = line.lstrip("# ").strip()
        if line.startswith("#") and stripped.startswith("schema:"):
            target = stripped.split(":", 1)[1].strip()
            module_name, _, class_name = target.partition(":")
            try:
                model = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError, ValueError, TypeError):
                model = None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigError(
                    f"config {str(path)!r} declares the schema {target!r}, which is not an alambic config class",
                    "fix or remove the '# schema: module:Class' comment (e.g. alambic.generate.config:GenerateConfig)",
                )
            return model
    return DistillConfig
