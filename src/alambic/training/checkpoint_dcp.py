"""Sharded checkpoints for `train.strategy: fsdp`, with PyTorch Distributed Checkpoint.

A checkpoint is the same `checkpoints/step-000123/` folder as under ddp, made
the same way: every process writes its own shard of the student and of the
AdamW state (`__<rank>_0.distcp`, in parallel) plus its RNG state into one
temporary sibling folder (`alambic.durable.atomic_dir`, owned by the main
process); after a barrier the main process writes the scheduler and
`state.json`, fsyncs every file and the folder, and renames it into place. A
run killed at any moment (kill -9 of any process) leaves only complete step
folders; a temporary one is hidden (its name starts with a dot) and ignored.
`checksums.json` records every file's size and sha256, as under ddp, so a shard
damaged after it was written is found at resume and an older step is used.

Distributed Checkpoint stores each tensor with its global shape and the piece
each rank held, so a checkpoint resumes on any number of processes (2 -> 1,
1 -> 2): each rank reads the pieces that overlap its new shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from alambic.durable import atomic_dir, atomic_write_json, fsync_file
from alambic.errors import ConfigError
from alambic.training.checkpoint import (
    CHECKPOINT_PREFIX,
    CHECKSUMS,
    _checksums,
    _rng_as_tensors,
    _rng_from_tensors,
    list_checkpoints,
    restore_rng_state,
    rng_state,
)

METADATA = ".metadata"  # written by Distributed Checkpoint's coordinator


def is_dcp_checkpoint(path) -> bool:
    return (Path(path) / METADATA).exists()


def wrong_format_error(path, written_by: str, running: str) -> ConfigError:
    return ConfigError(
        f"checkpoint {path} was written with train.strategy={written_by}; this run uses train.strategy={running}",
        f"resume with train.strategy={written_by}, or start a new run (--overwrite or another train.output_dir)",
    )


def _state(student, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(student, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_dcp_checkpoint(run_dir, step: int, student, optimizer, scheduler, extra: dict, keep_last: int, rank: int) -> Path:
    """Collective: every process calls it. Returns the step folder.

    The main process owns the step folder's `atomic_dir` (alambic.durable): it
    creates the temporary sibling, tells every process its name, and publishes
    it once every process has written and fsynced its shard.
    """
    final = Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    if rank == 0:
        with atomic_dir(final) as temporary:  # re-saving a step after a resume replaces it whole
            _write_shards(temporary, step, student, optimizer, scheduler, extra, rank)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        _write_shards(None, step, student, optimizer, scheduler, extra, rank)
    dist.barrier()
    return final


def _write_shards(temporary: Path | None, step, student, optimizer, scheduler, extra, rank) -> None:
    import torch.distributed.checkpoint as dcp

    name = [str(temporary) if temporary is not None else None]
    dist.broadcast_object_list(name, src=0)
    temporary = Path(name[0])
    dcp.save(_state(student, optimizer), checkpoint_id=str(temporary))  # each process writes its own shard
    rng_file = temporary / f"rng-rank{rank}.pt"
    torch.save(_rng_as_tensors(rng_state()), rng_file)
    for own in [rng_file, *temporary.glob(f"__{rank}_*.distcp")]:
        fsync_file(own)
    dist.barrier()  # every shard is on disk before the main process publishes the folder
    if rank == 0:
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        state = {"step": step, "format": "torch.distributed.checkpoint", "world_size": dist.get_world_size(), **extra}
        atomic_write_json(temporary / "state.json", state)
        # The same checksums as a ddp checkpoint: a shard damaged later is found at resume
        # (training/checkpoint.py: checkpoint_problem) and the run falls back to an older step.
        atomic_write_json(temporary / CHECKSUMS, _checksums(temporary))


def load_dcp_checkpoint(path, student, optimizer, scheduler, rank: int) -> dict:
    """Collective. Restores the student's and optimizer's shards (any number of processes), scheduler, RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = _state(student, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.exists():  # resumed on more processes than wrote it: the extra ranks take rank 0's
        rng_file = path / "rng-rank0.pt"
    restore_rng_state(_rng_from_tensors(torch.load(rng_file, weights_only=True)))
    return json.loads((path / "state.json").read_text())
