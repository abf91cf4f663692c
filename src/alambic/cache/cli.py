"""`alambic cache-logits`: run the teacher once over the training data and cache its top-k.

    alambic cache-logits configs/tiny_kd.yaml --k 64 --out runs/cache
    alambic cache-logits configs/tiny_kd.yaml --k 64 --out runs/cache --resume   # after a kill
    alambic distill configs/tiny_kd.yaml teacher.model=null teacher.cache=runs/cache
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import typer

from alambic.errors import ConfigError, ModelError

DEFAULT_MAX_BYTES_PER_TOKEN = 250


def resolve_value_bits(value_bits: str, vocab_size: int, k: int, max_bytes: int) -> int:
    """'auto' = the most bits (<= 8) whose record fits `max_bytes`; else an explicit 1..16."""
    from alambic.cache.format import MAX_VALUE_BITS, largest_value_bits

    if value_bits == "auto":
        bits = largest_value_bits(vocab_size, k, max_bytes)
        if bits is None:
            raise ConfigError(
                f"k={k} over a {vocab_size}-token vocabulary does not fit in {max_bytes} bytes per token",
                "lower --k or raise --max-bytes-per-token",
            )
        return bits
    try:
        bits = int(value_bits)
    except ValueError:
        bits = 0
    if not 1 <= bits <= MAX_VALUE_BITS:
        raise ConfigError(f"--value-bits must be 'auto' or an integer in 1..{MAX_VALUE_BITS}, got {value_bits!r}")
    return bits


def _teacher_logits_fn(model, device):
    import torch

    def compute(batch: dict) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"].to(device)}
        if "position_ids" in batch:  # packed rows: block-diagonal causal mask, as in training
            inputs["position_ids"] = batch["position_ids"].to(device)
        else:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        return model(**inputs, use_cache=False).logits

    return compute


def _process_group() -> int:
    """The number of processes; joins their group when launched by torchrun / accelerate launch."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world


def _default_device(world: int) -> str:
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 else "cuda"


def cache_logits(
    config_path: str, overrides: list[str], k: int, out: str | None, shard_rows: int, batch_size: int,
    value_bits: str, max_bytes_per_token: int, resume: bool, overwrite: bool, device: str | None, progress: bool,
) -> dict:
    """Everything the command does, callable from Python; returns the manifest."""
    import torch

    from alambic.cache.identity import CacheIdentity, rows_hash, tokenizer_hash, weight_hash
    from alambic.cache.writer import check_folder_before_teacher, write_logit_cache
    from alambic.config import DistillConfig, load_config
    from alambic.data import build_datasets
    from alambic.models import freeze, load_model, load_tokenizer
    from alambic.output_paths import check_output_folder

    config = load_config(config_path, overrides, DistillConfig)
    if config.task == "sequence_classification":  # class logits are small: stored whole (cache/class_logits.py)
        from alambic.cache.class_logits import cache_class_logits

        return cache_class_logits(config, out, batch_size, overwrite, device, progress)
    if config.teacher is None or config.teacher.model is None:
        raise ConfigError("cache-logits runs the teacher: set teacher.model in the config", "e.g. teacher.model=org/model")
    folder = out or config.teacher.cache
    if folder is None:
        raise ConfigError("where should the cache go? pass --out FOLDER (or set teacher.cache)")
    check_output_folder(folder, "--out" if out else "teacher.cache")
    tokenizer = load_tokenizer(config.teacher, role="teacher")
    vocab_size = len(tokenizer)
    if not 1 <= k <= vocab_size:
        raise ConfigError(f"--k must be in 1..{vocab_size} (the teacher's vocabulary), got {k}")
    bits = resolve_value_bits(value_bits, vocab_size, k, max_bytes_per_token)
    train, _ = build_datasets(config.data, tokenizer, task=config.task, seed=config.train.seed)
    digest, total_tokens = rows_hash(train)
    identity = CacheIdentity(
        teacher=config.teacher.model, teacher_revision=config.teacher.revision, teacher_weight_hash="",
        tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=vocab_size, k=k, value_bits=bits,
        temperature=float(config.loss.temperature), dataset_fingerprint=train.fingerprint, rows_hash=digest,
        num_rows=len(train), num_tokens=total_tokens, shard_rows=shard_rows,
    )
    check_folder_before_teacher(folder, identity, resume, overwrite)  # fail before loading a large model
    world = _process_group()  # > 1 under torchrun / accelerate launch: each process writes its own shards
    device = device or _default_device(world)
    model = freeze(load_model(config.teacher, config.task, role="teacher")).to(device)
    head_rows = model.get_output_embeddings().weight.shape[0]
    if head_rows < vocab_size:
        raise ModelError(f"the teacher's output layer has {head_rows} rows but its tokenizer {vocab_size} tokens")
    identity = replace(identity, teacher_weight_hash=weight_hash(model))
    if world > 1:
        from alambic.cache.distributed import write_logit_cache_distributed

        return write_logit_cache_distributed(
            folder, train, _teacher_logits_fn(model, device), identity, batch_size=batch_size,
            pad_token_id=tokenizer.pad_token_id, resume=resume, overwrite=overwrite,
        )
    if resume and not overwrite:
        from alambic.cache.distributed import merge_journals

        merge_journals(folder)  # shards finished by the processes of an interrupted multi-process run
    return write_logit_cache(
        folder, train, _teacher_logits_fn(model, device), identity, batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id, resume=resume, overwrite=overwrite, progress=progress,
    )


def register(app: typer.Typer) -> None:
    @app.command("cache-logits")
    def cache_logits_command(
        config: str = typer.Argument(..., help="YAML config (teacher.model, data, loss.temperature are used)"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides"),
        k: int = typer.Option(64, "--k", min=1, help="tokens kept per position"),
        out: Optional[str] = typer.Option(None, "--out", help="cache folder (default: teacher.cache)"),
        shard_rows: int = typer.Option(1024, "--shard-rows", min=1, help="dataset rows per shard (the resume unit)"),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="rows per teacher forward pass"),
        value_bits: str = typer.Option("auto", "--value-bits", help="bits per log-probability, or 'auto'"),
        max_bytes_per_token: int = typer.Option(
            DEFAULT_MAX_BYTES_PER_TOKEN, "--max-bytes-per-token", min=8, help="budget that 'auto' value bits fit"
        ),
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted cache in --out"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete the cache in --out and start again"),
        device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: cuda if available)"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Run the teacher once over the training data and store its top-k log-probabilities.

        Under torchrun / accelerate launch every process runs the teacher on its share of the shards.
        """
        import os

        progress = progress and os.environ.get("WORLD_SIZE", "1") == "1"
        manifest = cache_logits(
            config, overrides or [], k, out, shard_rows, batch_size, value_bits, max_bytes_per_token,
            resume, overwrite, device, progress,
        )
        if manifest.get("kind") == "class_logits":
            typer.echo(f"cached the class logits of {manifest['num_rows']} rows ({manifest['num_classes']} classes)")
            return
        identity = manifest["identity"]
        if os.environ.get("RANK", "0") != "0":
            return
        typer.echo(
            f"cached {identity['num_tokens']} tokens of {identity['num_rows']} rows in {len(manifest['shards'])} "
            f"shards: k={identity['k']}, {identity['value_bits']}-bit values, {manifest['bytes_per_token']} B/token"
        )
