"""Build a student from its teacher and report it before any training (the library of `alambic init-student`).

Depth: keep a list of layers, every k-th layer, or a uniform selection
(`method: select`), or average adjacent layers (`method: average`). Width
(`method: prune`): drop the attention heads and MLP / hidden channels with the
lowest activation importance on calibration text (models/pruning.py). The
student is saved with save_pretrained (safetensors) and the teacher's tokenizer,
ready for `alambic distill` as `student.model`; `quantize: int8` also writes a
weight-only int8 copy in the compressed-tensors format (models/qat.py), which
`from_pretrained` loads. Parameters, size on disk, held-out
CE and KL to the teacher are printed and written to `init_report.json`.

    alambic init-student configs/init_student.yaml
    alambic init-student configs/init_student.yaml method=average num_layers=1 --overwrite
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from alambic.config import ModelConfig, Strict
from alambic.errors import ConfigError
from alambic.models.encoder_init import init_encoder_student, refuse_mismatched_task
from alambic.models.vocab_trim import VocabConfig
from alambic.output_paths import atomic_output_dir, check_output_folder

Keep = int | float


class WidthConfig(Strict):
    """How much width each layer keeps: a count (int) or a fraction of the teacher's (float in (0, 1])."""

    heads_keep: Keep | None = Field(None, description="query heads per layer")
    mlp_keep: Keep | None = Field(None, description="MLP intermediate channels per layer")
    hidden_keep: Keep | None = Field(None, description="hidden (embedding) channels")
    gqa: Literal["auto", "within_groups", "whole_groups"] = Field(
        "auto", description="grouped-query attention: prune query heads within groups, or whole KV groups"
    )

    @field_validator("heads_keep", "mlp_keep", "hidden_keep")
    @classmethod
    def _count_or_fraction(cls, value):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("a fraction must be in (0, 1]; write a whole number for a count")
        if isinstance(value, int) and value < 1:
            raise ValueError("a count must be at least 1")
        return value

    @model_validator(mode="after")
    def _something_to_prune(self) -> "WidthConfig":
        if self.heads_keep is None and self.mlp_keep is None and self.hidden_keep is None:
            raise ValueError("width needs heads_keep, mlp_keep or hidden_keep")
        return self


class CalibrationData(Strict):
    calibration: str = Field(..., description="text file (JSONL/CSV/...) used to rank heads and channels")
    eval: str | None = Field(None, description="held-out text for the report (default: calibration rows not used)")
    text_column: str = "text"
    calibration_samples: int = Field(64, ge=1)
    eval_samples: int = Field(64, ge=1)
    max_length: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)


class InitStudentConfig(Strict):
    """`alambic init-student`: a student built from the teacher's weights."""

    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    teacher: ModelConfig
    output_dir: str = "runs/init_student"
    method: Literal["select", "prune", "average"] = "select"
    layers: list[int] | Literal["all", "uniform", "every_k"] = "all"
    num_layers: int | None = Field(None, ge=1)
    every_k: int | None = Field(None, ge=1)
    width: WidthConfig | None = None
    data: CalibrationData
    vocab: VocabConfig | None = Field(None, description="classifiers: keep only the domain's tokens (models/vocab_trim.py)")
    quantize: Literal["none", "int8"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "InitStudentConfig":
        if self.teacher.model is None:
            raise ValueError("teacher.model is required (a hub id or a local folder)")
        if self.vocab is not None and self.task != "sequence_classification":
            raise ValueError("vocabulary trimming (vocab) is for encoder classifiers: set task: sequence_classification")
        if self.method == "prune" and self.width is None:
            raise ValueError("method 'prune' needs a width section (heads_keep / mlp_keep / hidden_keep)")
        if self.method != "prune" and self.width is not None:
            raise ValueError(f"width pruning needs method: prune (method is {self.method!r})")
        if self.method == "average" and (isinstance(self.layers, list) or (self.num_layers is None) == (self.every_k is None)):
            raise ValueError("method 'average' groups adjacent layers: give exactly one of num_layers or every_k")
        return self


# ----------------------------------------------------------------------------- building


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda but no GPU is visible", "set device: cpu (or auto)")
    return torch.device(choice)


def _text_dataset(path: str, key: str, config: InitStudentConfig, tokenizer, skip: int, count: int):
    from alambic.config import DataConfig
    from alambic.data import read_records, tokenize_records
    from alambic.data.datasets import TokenizedDataset

    if not Path(path).exists():
        raise ConfigError(f"{key} file {path!r} does not exist", f"check {key} in the config")
    records = read_records(path, skip + count)[skip:]
    data_cfg = DataConfig(train=path, text_column=config.data.text_column, max_length=config.data.max_length)
    rows = tokenize_records(records, tokenizer, data_cfg, path)
    return TokenizedDataset(rows, "", path) if rows else None


def load_texts(config: InitStudentConfig, tokenizer) -> tuple[object, object, bool]:
    """(calibration rows, eval rows, whether eval reuses the calibration text)."""
    data = config.data
    calibration = _text_dataset(data.calibration, "data.calibration", config, tokenizer, 0, data.calibration_samples)
    if calibration is None:
        raise ConfigError(f"data.calibration {data.calibration!r} has no text", "point it at a file of text records")
    if data.eval is not None:
        evaluation = _text_dataset(data.eval, "data.eval", config, tokenizer, 0, data.eval_samples)
        if evaluation is None:
            raise ConfigError(f"data.eval {data.eval!r} has no text", "point it at a file of text records")
        return calibration, evaluation, False
    rest = _text_dataset(data.calibration, "data.calibration", config, tokenizer, data.calibration_samples, data.eval_samples)
    return calibration, rest or calibration, rest is None


def _batches(dataset, tokenizer, batch_size: int, device):
    from alambic.data import collate

    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}


def shrink(teacher, config: InitStudentConfig, calibration, tokenizer, device):
    """The student: depth first (select / average), then width (prune) ranked on the depth-reduced model."""
    from alambic.models.averaging import average_layers, layer_groups
    from alambic.models.pruning import activation_importance, plan_width, prune_width
    from alambic.models.student import find_layer_list, layer_indices_for, select_layers

    total = len(find_layer_list(teacher)[2])
    if config.method == "average":
        student = average_layers(teacher, layer_groups(total, config.num_layers, config.every_k))
    else:
        strategy = list(range(total)) if config.layers == "all" else config.layers
        indices = layer_indices_for(total, config.num_layers, strategy, config.every_k)
        student = select_layers(teacher, indices)
    if config.method == "prune":
        width = config.width
        batches = _batches(calibration, tokenizer, config.data.batch_size, device)
        if config.progress:
            from rich.progress import track

            total_batches = -(-len(calibration) // config.data.batch_size)
            batches = track(batches, total=total_batches, description="calibrating importance", transient=True)
        importance = activation_importance(student, batches)
        plan = plan_width(student, importance, width.heads_keep, width.mlp_keep, width.hidden_keep, width.gqa)
        student = prune_width(student, plan)
    return student.to(device).eval()


# ----------------------------------------------------------------------------- reporting


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(path.stat().st_size for path in Path(folder).glob(pattern))


def describe(model, tokenizer, evaluation, teacher, config: InitStudentConfig, device) -> dict:
    """Shape, parameters and held-out CE / KL to the teacher of one model."""
    from alambic.models.quantize import count_parameters
    from alambic.teachers.live import LiveTeacher
    from alambic.evaluate.heldout import evaluate
    from alambic.models.module import StudentModule

    vocab = len(tokenizer)
    source = LiveTeacher(teacher, vocab) if teacher is not None else None
    metrics = evaluate(
        StudentModule(model, vocab), source, evaluation, "causal_lm", tokenizer.pad_token_id,
        config.data.batch_size, device,
    )
    cfg = model.config
    return {
        "layers": cfg.num_hidden_layers,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "hidden_size": cfg.hidden_size,
        "parameters": count_parameters(model),
        **{key.removeprefix("eval_"): value for key, value in metrics.items()},
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"init-student ({report['method']}) -> {report['output_dir']}")
    for column in ("model", "layers", "heads/kv", "mlp", "hidden", "params", "MB", "CE", "KL"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, label in (("teacher", "teacher"), ("student", "student"), ("student_int8", "int8")):
        row = report.get(name)
        if row is None:
            continue
        kl = row.get("kl")
        table.add_row(
            label, str(row["layers"]), f"{row['attention_heads']}/{row['kv_heads']}", str(row["intermediate_size"]),
            str(row["hidden_size"]), f"{row['parameters']:,}", f"{row['size_bytes'] / 1e6:.2f}", f"{row['ce']:.4f}",
            "-" if kl is None else f"{kl:.4f}",
        )
    console = Console()
    console.print(table)
    console.print("CE: held-out cross-entropy (nats/token); KL: KL(teacher || model) per token, before any training")
    if report["eval"]["on_calibration_text"]:
        console.print("[yellow]note:[/] the report is on the calibration text (no held-out rows were left)")


def _write_int8(student, tokenizer, evaluation, teacher, config, device, folder: Path) -> dict:
    """folder/int8: weight-only int8 of every linear layer (an untied head too; a tied one shares the float
    embedding), one scale per output row, compressed-tensors (from_pretrained loads it)."""
    from alambic.models.qat import export_compressed, quantizable_linears, quantized_copy

    export_compressed(student, folder / "int8", 8, None, ignore=(), tokenizer=tokenizer)
    row = describe(quantized_copy(student, 8, None, ignore=()), tokenizer, evaluation, teacher, config, device)
    row["size_bytes"] = folder_bytes(folder / "int8")
    row["quantized_modules"] = len(quantizable_linears(student, None, []))
    return row


def _check_output(config: InitStudentConfig, overwrite: bool) -> Path:
    output = check_output_folder(config.output_dir, "output_dir")
    if output.exists() and not overwrite:
        raise ConfigError(f"output_dir {str(output)!r} already exists", "pass --overwrite or choose another output_dir")
    return output


def init_student(config: InitStudentConfig, overwrite: bool = False) -> dict:
    """Build, save and evaluate the student; returns the report (also in output_dir/init_report.json)."""
    from alambic.models import freeze, load_model, load_tokenizer
    from alambic.models.quantize import state_bytes

    refuse_mismatched_task(config.task, config.teacher.model)  # never load a classifier as an LM
    if config.task == "sequence_classification":
        return init_encoder_student(config, overwrite)
    output = _check_output(config, overwrite)
    device = _device(config.device)
    tokenizer = load_tokenizer(config.teacher, role="teacher")
    calibration, evaluation, on_calibration = load_texts(config, tokenizer)
    teacher = freeze(load_model(config.teacher, config.task, role="teacher")).to(device)
    student = shrink(teacher, config, calibration, tokenizer, device)
    with atomic_output_dir(output) as temporary:  # no empty parent folder is left behind on failure
        student.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        report = {"method": config.method, "output_dir": str(output), "teacher_model": config.teacher.model}
        teacher_folder = Path(config.teacher.model).expanduser()
        report["teacher"] = describe(teacher, tokenizer, evaluation, None, config, device)
        teacher_size = folder_bytes(teacher_folder) if teacher_folder.is_dir() else 0
        report["teacher"]["size_bytes"] = teacher_size or state_bytes(teacher)
        report["student"] = describe(student, tokenizer, evaluation, teacher, config, device)
        report["student"]["size_bytes"] = folder_bytes(temporary)
        report["student"]["kept_layers"] = getattr(student.config, "alambic_selected_layers", None)
        report["student"]["averaged_layers"] = getattr(student.config, "alambic_averaged_layers", None)
        if config.quantize == "int8":
            report["student_int8"] = _write_int8(student, tokenizer, evaluation, teacher, config, device, temporary)
        report["eval"] = {"source": config.data.eval or config.data.calibration, "rows": len(evaluation),
                          "on_calibration_text": on_calibration, "calibration_rows": len(calibration)}
        (temporary / "init_report.json").write_text(json.dumps(report, indent=2))
    return report
