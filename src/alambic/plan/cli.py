"""`alambic plan CONFIG [--processes N] [--device-memory GB]`: will this run fit, and how to launch it.

Reads only the model configs (config.json) and the training data's tokens; no
weights. Prints the per-process memory of DDP and FSDP for each teacher
placement (co-located, sharded, offline cache), which fit in --device-memory,
the recommendation, and the disk size of a logit cache of the training data.

    alambic plan configs/tiny_kd.yaml --processes 8 --device-memory 80
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from alambic.plan.estimate import DTYPE_BYTES, RUNTIME_BYTES, Estimate, Workload, estimate, model_shape

GB = 10**9  # decimal, as GPU memory is sold (80 GB = 80e9 bytes)
# From fastest to most frugal: the first that fits is recommended.
COMBINATIONS = (("ddp", "co-located"), ("fsdp", "co-located"), ("fsdp", "sharded"), ("ddp", "cache"), ("fsdp", "cache"))


def _hf_config(model: str, role: str):
    from transformers import AutoConfig

    from alambic.errors import ModelError
    from alambic.models.loading import resolve_model_source

    source = resolve_model_source(model, role)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the {role}'s config.json from {source!r}: {err}") from None


def _dtype_bytes(name: str, hf_config) -> int:
    if name == "auto":
        name = str(getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None) or "float32")
        name = name.replace("torch.", "")
    return DTYPE_BYTES.get(name, 4)


def _student_config(config, teacher_hf):
    if config.student.model is not None:
        return _hf_config(config.student.model, "student")
    import copy

    student = copy.deepcopy(teacher_hf)
    init = config.student.from_teacher
    student.num_hidden_layers = init.num_layers or max(1, teacher_hf.num_hidden_layers // 2)
    return student


def _cache_disk_bytes(config, k: int) -> tuple[int, int]:
    """(tokens of the training data, bytes of a top-k logit cache of it)."""
    from alambic.cache.cli import DEFAULT_MAX_BYTES_PER_TOKEN, resolve_value_bits
    from alambic.cache.format import RecordLayout
    from alambic.data import build_datasets
    from alambic.models import load_tokenizer

    source = config.teacher if config.teacher is not None and config.teacher.model else config.student
    tokenizer = load_tokenizer(source, role="teacher" if source is config.teacher else "student")
    train, _ = build_datasets(config.data, tokenizer, task=config.task, seed=config.train.seed)
    tokens = sum(len(train[i]["input_ids"]) for i in range(len(train)))
    vocab = len(tokenizer)
    k = min(k, vocab)
    bits = resolve_value_bits("auto", vocab, k, DEFAULT_MAX_BYTES_PER_TOKEN)
    return tokens, tokens * RecordLayout(vocab, k, bits).record_bytes


def keeps_attention_maps(config, student_hf) -> bool:
    """Whether the student's attention keeps [heads, L, L] probabilities for backward.

    SDPA (the Hugging Face default, on CPU and GPU) runs a flash-style kernel that
    keeps only per-row statistics, with or without a padding mask (checked on
    torch 2.13 CPU); eager attention keeps the probabilities. Attention transfer
    (`representation.attention`) switches the models to eager to read the maps.
    """
    transfer = config.representation is not None and config.representation.attention is not None
    return transfer or getattr(student_hf, "_attn_implementation", None) == "eager"


def plan(config, processes: int, device_gb: float | None, k: int, with_cache_size: bool = True) -> dict:
    teacher_hf = _hf_config(config.teacher.model, "teacher") if config.teacher and config.teacher.model else None
    student_hf = _student_config(config, teacher_hf)
    student = model_shape(student_hf, 4)
    teacher = model_shape(teacher_hf, _dtype_bytes(config.teacher.dtype, teacher_hf)) if teacher_hf else None
    work = Workload(
        batch=config.train.batch_size, length=config.data.max_length, fused=config.loss.fused,
        chunk=config.loss.chunk_size, activation_checkpointing=config.train.fsdp.activation_checkpointing, top_k=k,
        activation_bytes=2 if config.train.mixed_precision != "no" else 4,
        quadratic_attention=keeps_attention_maps(config, student_hf),
        runtime_bytes=RUNTIME_BYTES["cpu" if config.train.cpu else "cuda"],
    )
    placements = [c for c in COMBINATIONS if teacher is not None or c[1] == "cache"]
    if config.teacher is None:
        placements = [("ddp", "none"), ("fsdp", "none")]
    elif getattr(config.teacher, "server", None):  # a served teacher runs elsewhere
        placements = [("ddp", "served"), ("fsdp", "served")]
    estimates = [estimate(student, teacher, work, s, p, processes) for s, p in placements]
    device_bytes = None if device_gb is None else int(device_gb * GB)
    fitting = [e for e in estimates if e.fits(device_bytes) is not False]
    result = {
        "processes": processes, "device_memory_gb": device_gb,
        "student_parameters": student.parameters, "teacher_parameters": teacher.parameters if teacher else 0,
        # The main process reads the full weights into CPU memory (FSDP: the others build on meta; DDP: every process).
        "host_load_bytes": 4 * student.parameters + (teacher.parameters * teacher.bytes_per_parameter if teacher else 0),
        "estimates": [{"strategy": e.strategy, "teacher": e.teacher, "parts": e.parts, "peak": e.peak,
                       "fits": e.fits(device_bytes)} for e in estimates],
        "recommendation": _recommend(fitting[0]) if fitting else
        "nothing fits: set train.fsdp.activation_checkpointing: true, lower train.batch_size or data.max_length, "
        "or use more processes",
    }
    if with_cache_size and config.teacher is not None:
        result["cache_tokens"], result["cache_bytes"] = _cache_disk_bytes(config, k)
    return result


def _recommend(best: Estimate) -> str:
    teacher = {"co-located": "a full teacher on every process", "sharded": "train.fsdp.shard_teacher: true",
               "cache": "an offline logit cache (alambic cache-logits, then teacher.cache)", "none": "no teacher",
               "served": "the served teacher (teacher.server)"}[best.teacher]
    extra = " train.fsdp.shard_teacher=false" if best.strategy == "fsdp" and best.teacher == "co-located" else ""
    return f"train.strategy={best.strategy}{extra} with {teacher}"


def _table(result: dict) -> str:
    estimates = result["estimates"]
    names = [f"{e['strategy']}/{e['teacher']}" for e in estimates]
    parts = list(dict.fromkeys(name for e in estimates for name in e["parts"]))
    width = max(len(p) for p in parts + ["peak per process"]) + 2
    lines = ["".ljust(width) + "".join(n.rjust(18) for n in names)]
    for part in parts:
        lines.append(part.ljust(width) + "".join(_gb(e["parts"].get(part)).rjust(18) for e in estimates))
    lines.append("peak per process".ljust(width) + "".join(_gb(e["peak"]).rjust(18) for e in estimates))
    if result["device_memory_gb"] is not None:
        lines.append("fits".ljust(width) + "".join(("yes" if e["fits"] else "no").rjust(18) for e in estimates))
    return "\n".join(lines)


def _gb(value) -> str:
    if value is None:
        return "-"
    return f"{value / GB:.2f} GB" if value >= GB / 10 else f"{value / 10**6:.1f} MB"


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_command(
        config: str = typer.Argument(..., help="YAML config of the run"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides"),
        processes: int = typer.Option(1, "--processes", min=1, help="processes (GPUs) the run will use"),
        device_memory: Optional[float] = typer.Option(None, "--device-memory", min=0.001, help="GB per device"),
        k: int = typer.Option(64, "--k", min=1, help="top-k of a logit cache (for its size)"),
        as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
    ) -> None:
        """Per-process memory for DDP / FSDP and each teacher placement, from model configs only."""
        from alambic.compat import check_compatible
        from alambic.config import DistillConfig, load_config

        resolved = load_config(config, overrides or [], DistillConfig)
        check_compatible(resolved)
        result = plan(resolved, processes, device_memory, k)
        if as_json:
            typer.echo(json.dumps(result, indent=1))
            return
        typer.echo(f"student {result['student_parameters']:,} parameters, teacher {result['teacher_parameters']:,}; "
                   f"{processes} process(es), batch {resolved.train.batch_size} x {resolved.data.max_length} tokens each")
        typer.echo(_table(result))
        typer.echo(f"recommended: {result['recommendation']}")
        typer.echo(f"host (CPU) memory while loading: {_gb(result['host_load_bytes'])} in the main process "
                   "(under ddp in every process; under fsdp the others receive their shards from it)")
        if "cache_bytes" in result:
            typer.echo(f"logit cache of the training data (k={k}): {result['cache_tokens']:,} tokens, "
                       f"{_gb(result['cache_bytes'])} on disk")
