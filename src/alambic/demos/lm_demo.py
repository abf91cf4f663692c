"""`alambic demo --task lm`: a Llama-style teacher trained on the Python standard library, distilled into a smaller one.

Everything is offline and seeded. The teacher (4 layers, width 192, a byte-level
BPE tokenizer of 2048 tokens) ships with the package in `alambic/assets/lm_teacher`
(8.7 MB of safetensors): it was trained once for 2000 steps by
`python -m alambic.demos.lm_teacher`, whose manifest lists the modules it saw;
validation and held-out modules come only from the ones it never saw.
`teacher_source=train` trains a teacher inside the demo instead (the old, slower
and weaker way; also what `--quick` does with tiny sizes).

The student has fewer layers and a smaller width (pruned from the teacher by
default). It is trained twice from the same init, on the same small transfer set
(24 of the teacher's modules) for the same steps: once with KD from the teacher
(forward KL on the full next-token distribution) and once on the data alone
(CE). The report gives held-out bits per byte and the share of the CE student's
gap to the teacher that KD closes. Defaults were chosen on the validation
modules (runs in docs/demo.md), never on the held-out ones.

    alambic demo --task lm                         # about 5 minutes on 2 CPU cores
    alambic demo --task lm student_init=random     # a randomly initialised student instead of one pruned from the teacher
    alambic demo --task lm --quick                 # a few steps, for the tests
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alambic.config import DistillConfig, Objective, Strict, apply_overrides, read_yaml, validate_mapping
from alambic.demos.bbc import write_jsonl
from alambic.demos.demo import MARKER, StageClock, console, prepare_output
from alambic.errors import ConfigError


class LMSize(Strict):
    layers: int = Field(ge=1)
    hidden: int = Field(ge=8)
    heads: int = Field(ge=1)
    intermediate: int = Field(ge=8)


class LMDemoConfig(Strict):
    output_dir: str = "runs/demo-lm"
    seed: int = 0
    teacher_source: Literal["shipped", "train"] = Field(
        "shipped", description="shipped: the packaged teacher (alambic/assets/lm_teacher); train: train one here")
    student_init: Literal["prune", "random"] = Field(
        "prune", description="prune: keep teacher layers `student_layers`, then prune width (Minitron-style); random")
    student_layers: list[int] = Field([0, 3], min_length=1, description="teacher layers a pruned student keeps")
    train_modules: int = Field(24, ge=2, description="the students' transfer set: this many of the teacher's "
                               "training modules (a small set is where KD's soft targets matter most)")
    validation_modules: int = Field(6, ge=1)
    heldout_modules: int = Field(16, ge=1)
    vocab_size: int = Field(2048, ge=300, description="teacher_source=train: its BPE tokenizer's size")
    max_length: int = Field(128, ge=16)
    batch_size: int = Field(16, ge=1)
    teacher: LMSize = Field(LMSize(layers=4, hidden=192, heads=4, intermediate=512),
                            description="teacher_source=train only (the shipped teacher has its own config)")
    student: LMSize = LMSize(layers=2, hidden=128, heads=4, intermediate=344)
    teacher_steps: int = Field(400, ge=1)
    teacher_lr: float = Field(2e-3, gt=0)
    student_steps: int = Field(300, ge=1)
    student_lr: float = Field(1e-3, gt=0, description="1e-3 suits a pruned student; "
                              "a random init wants ~3e-3")
    warmup_steps: int = Field(30, ge=0)
    objective: Objective = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the hard-label CE mixed into the KD loss")
    eval_every: int = Field(50, ge=0)
    eval_batches: int | None = Field(4, ge=1)
    heldout_limit_bytes: int | None = Field(None, ge=1000, description="cut each held-out module to this size")
    measure_speed: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _pruned_depth(self) -> "LMDemoConfig":
        if self.student_init == "prune" and len(self.student_layers) != self.student.layers:
            raise ValueError(f"student_layers {self.student_layers} keeps {len(self.student_layers)} teacher layers "
                             f"but student.layers is {self.student.layers}; make them agree")
        return self


LM_QUICK = {"output_dir": "runs/demo-lm-quick", "train_modules": 6, "validation_modules": 1, "heldout_modules": 2,
            "vocab_size": 400, "max_length": 32, "batch_size": 4,
            "teacher": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64},
            "student": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
            "teacher_steps": 6, "student_steps": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
            "heldout_limit_bytes": 2000, "teacher_source": "train", "student_layers": [1]}


def lm_demo_config(config_path: str | None, overrides: list[str], quick: bool) -> LMDemoConfig:
    raw = json.loads(json.dumps(LM_QUICK)) if quick else {}
    if config_path:
        raw.update(read_yaml(config_path))
    raw = apply_overrides(raw, overrides)
    return validate_mapping(raw, LMDemoConfig, config_path or "alambic demo --task lm")


def shipped_teacher() -> tuple[Path, dict]:
    from alambic.demos.lm_assets import SHIPPED, load_manifest

    manifest = load_manifest(SHIPPED)
    if manifest is None or not (SHIPPED / "model.safetensors").is_file():
        raise ConfigError(f"the packaged LM teacher is missing from {SHIPPED}",
                          "reinstall alambic, run `python -m alambic.demos.lm_teacher` to rebuild it, "
                          "or use teacher_source=train")
    return SHIPPED, manifest


def check_before_writing(config: LMDemoConfig) -> None:
    """Errors the run would hit minutes in (a missing teacher, layers it lacks), before the run folder exists."""
    depth = shipped_teacher()[1]["size"]["layers"] if config.teacher_source == "shipped" else config.teacher.layers
    if config.student_init == "prune" and not all(0 <= i < depth for i in config.student_layers):
        raise ConfigError(f"student_layers {config.student_layers}: the teacher has {depth} layers",
                          f"choose student_layers from 0..{depth - 1}")


def corpus_splits(config: LMDemoConfig) -> dict[str, list[str]]:
    """Texts of whole modules: train, validation, held-out (disjoint; never seen by a shipped teacher)."""
    if config.teacher_source == "shipped":
        from alambic.demos.lm_assets import read_modules

        modules = shipped_teacher()[1]["modules"]
        return {"train": read_modules(modules["train"])[: config.train_modules],
                "validation": read_modules(modules["validation"])[: config.validation_modules],
                "heldout": read_modules(modules["heldout"])[: config.heldout_modules]}
    from alambic.data.stdlib_corpus import stdlib_module_texts

    pool, heldout = stdlib_module_texts(
        n_train=config.train_modules + config.validation_modules, n_heldout=config.heldout_modules, seed=config.seed,
        skip_generated=True,
    )
    return {"train": pool[: config.train_modules], "validation": pool[config.train_modules :], "heldout": heldout}


def prepare_corpus(config: LMDemoConfig, folder: Path) -> dict[str, Path]:
    splits = corpus_splits(config)
    if config.heldout_limit_bytes:
        splits["heldout"] = [text[: config.heldout_limit_bytes] for text in splits["heldout"]]
    paths = {}
    for name, texts in splits.items():
        paths[name] = write_jsonl([{"text": t} for t in texts], folder / "data" / f"{name}.jsonl")
        console.print(f"{name}: {len(texts)} modules, {sum(len(t.encode()) for t in texts) / 1e3:,.0f} kB")
    return paths


def build_llama(config: LMDemoConfig, size: LMSize, tokenizer, target: Path, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(model_config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    console.print(f"{target.name}: {size.layers} layers, width {size.hidden}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters")
    return target


def pruned_student(config: LMDemoConfig, teacher: Path, paths: dict[str, Path], target: Path) -> Path:
    """Keep `student_layers` of the teacher, then its most important heads and channels on train text."""
    from alambic.models.init_student import CalibrationData, InitStudentConfig, WidthConfig, init_student

    size = config.student
    init_student(InitStudentConfig(
        teacher={"model": str(teacher)}, output_dir=str(target), method="prune", layers=config.student_layers,
        width=WidthConfig(heads_keep=size.heads, mlp_keep=size.intermediate, hidden_keep=size.hidden),
        data=CalibrationData(calibration=str(paths["train"]), eval=str(paths["validation"]), calibration_samples=64,
                             eval_samples=16, max_length=config.max_length),
        device="cpu", progress=config.progress), overwrite=True)
    console.print(f"{target.name}: teacher layers {config.student_layers}, width {size.hidden}, "
                  f"{size.heads} heads, MLP {size.intermediate}")
    return target


def build_teacher_init(config: LMDemoConfig, paths: dict[str, Path], folder: Path) -> Path:
    from alambic.data import read_records
    from alambic.data.stdlib_corpus import build_tokenizer

    tokenizer = build_tokenizer([r["text"] for r in read_records(paths["train"])], vocab_size=config.vocab_size)
    return build_llama(config, config.teacher, tokenizer, folder / "teacher_init", config.seed)


def build_student_init(config: LMDemoConfig, paths: dict[str, Path], teacher: Path, folder: Path) -> Path:
    from alambic.models import load_tokenizer
    from alambic.config import ModelConfig

    if config.student_init == "prune":
        return pruned_student(config, teacher, paths, folder / "student_init")
    tokenizer = load_tokenizer(ModelConfig(model=str(teacher)), role="teacher")
    return build_llama(config, config.student, tokenizer, folder / "student_init", config.seed + 1)


def lm_train_config(config: LMDemoConfig, paths: dict[str, Path], student: Path, output: Path,
                    teacher: Path | None, steps: int, lr: float) -> DistillConfig:
    raw = {
        "task": "causal_lm",
        "teacher": {"model": str(teacher)} if teacher else None,
        "student": {"model": str(student)},
        "data": {"train": str(paths["train"]), "eval": str(paths["validation"]), "format": "text",
                 "max_length": config.max_length, "packing": True},
        "loss": {"objective": config.objective, "temperature": config.temperature, "alpha": config.alpha},
        "train": {"output_dir": str(output), "seed": config.seed, "lr": lr, "max_steps": steps,
                  "batch_size": config.batch_size, "warmup_steps": min(config.warmup_steps, steps - 1),
                  "eval_every": config.eval_every, "eval_batches": config.eval_batches, "progress": config.progress,
                  "weight_decay": 0.01, "cpu": True},
    }
    return DistillConfig.model_validate(raw)


def lm_targets(report: dict) -> list[dict]:
    from alambic.evaluate.metrics import gap_closed

    bpb = {name: entry["metrics"]["bits_per_byte"] for name, entry in report["models"].items()}
    closed = gap_closed(bpb["kd_student"], bpb["ce_student"], bpb["teacher"])
    report["kd_gap_closed"] = closed
    return [{"name": "KD share of the CE-student-to-teacher gap in bits per byte", "target": ">= 40%",
             "measured": "n/a" if closed is None else f"{closed:.1%} (teacher {bpb['teacher']:.3f}, "
             f"KD {bpb['kd_student']:.3f}, CE {bpb['ce_student']:.3f} bits/byte)",
             "met": closed is not None and closed >= 0.4}]


def run_lm_demo(config: LMDemoConfig) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    from alambic.config import dump_config
    from alambic.data import read_records
    from alambic.demos.demo import save_and_render
    from alambic.demos.demo_stages import train
    from alambic.evaluate.suite import ModelSpec, evaluate_causal_lms
    from alambic.durable import atomic_write_text

    hf_logging.set_verbosity_error()
    check_before_writing(config)
    folder = Path(config.output_dir)
    prepare_output(folder)
    atomic_write_text(folder / MARKER, dump_config(config))
    clock = StageClock()
    paths = clock.run("data: standard library modules", prepare_corpus, config, folder)
    if config.teacher_source == "shipped":
        teacher, manifest = shipped_teacher()
        console.print(f"teacher: {teacher} (trained {manifest['steps']} steps by `{manifest['command']}`)")
        teacher_run = None
    else:
        teacher_init = clock.run("teacher: init", build_teacher_init, config, paths, folder)
        teacher_run = clock.run("teacher: train on the corpus", train, lm_train_config(
            config, paths, teacher_init, folder / "teacher", None, config.teacher_steps, config.teacher_lr))
        teacher = teacher_run.output_dir / "final"
    student_init = clock.run("student: init", build_student_init, config, paths, teacher, folder)
    kd = clock.run("student: distil (KD)", train, lm_train_config(
        config, paths, student_init, folder / "kd_student", teacher, config.student_steps, config.student_lr))
    ce = clock.run("student: baseline (CE only)", train, lm_train_config(
        config, paths, student_init, folder / "ce_student", None, config.student_steps, config.student_lr))
    specs = [ModelSpec("teacher", str(teacher), "teacher"), ModelSpec("kd_student", str(kd.output_dir / "final")),
             ModelSpec("ce_student", str(ce.output_dir / "final"))]
    heldout = [r["text"] for r in read_records(paths["heldout"])]
    report = clock.run("evaluate on held-out modules", evaluate_causal_lms, specs, heldout, config.max_length,
                       config.measure_speed, show_progress=config.progress)
    report.update({
        "title": "Python stdlib: Llama-style teacher -> smaller student, KD vs CE at equal steps",
        "highlight": "kd_student", "eval_data": str(paths["heldout"]),
        "curves": {"kd_student": kd.history, "ce_student": ce.history},
        "teacher_curve": teacher_run.history if teacher_run else None,
        "setup": config.model_dump(mode="json"),
    })
    report["targets"] = lm_targets(report)
    report_path = save_and_render(report, folder, clock)
    _print_lm_summary(report, report_path)
    return report


def _print_lm_summary(report: dict, report_path: Path) -> None:
    for name, entry in report["models"].items():
        metrics = entry["metrics"]
        console.print(f"{name:>11}: {metrics['bits_per_byte']:.4f} bits/byte, perplexity {metrics['perplexity']:.2f}, "
                      f"{metrics['num_parameters']:,} parameters"
                      + (f", {metrics['tokens_per_s_batch1']:.0f} tokens/s at batch 1" if "tokens_per_s_batch1" in metrics else ""))
    for warning in report.get("speed_warnings") or []:
        console.print(f"  [yellow]speed warning[/] {warning}")
    for target in report["targets"]:
        console.print(f"  {target['name']}: {target['measured']} (target {target['target']}) "
                      + ("[green]met[/]" if target["met"] else "[red]not met[/]"))
    console.print(f"total wall time {report['total_seconds']:.0f} s; report: [bold]{report_path}[/]")
