"""Sharded checkpoints for `train.strategy: fsdp`, with PyTorch Distributed Checkpoint.

A checkpoint is the same `checkpoints/step-000123/` folder as under ddp, made
the same way: every process writes its own shard of the student and of the
AdamW state (`__<rank>_0.distcp`, in parallel) plus its RNG state into a
temporary sibling folder `.tmp-step-000123`; after a barrier the main process
writes the scheduler and `state.json`, fsyncs every file and the folder, and
renames it into place. A run killed at any moment (kill -9 of any process)
leaves only complete step folders (a folder counts once it holds `state.json`,
written last); the temporary one is removed by the next save.

Distributed Checkpoint stores each tensor with its global shape and the piece
each rank held, so a checkpoint resumes on any number of processes (2 -> 1,
1 -> 2): each rank reads the pieces that overlap its new shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from alambic.errors import ConfigError
from alambic.training.checkpoint import (
    CHECKPOINT_PREFIX,
    _rng_as_tensors,
    _rng_from_tensors,
    fsync_dir,
    fsync_file,
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
    """Collective: every process calls it. Returns the step folder."""
    import torch.distributed.checkpoint as dcp

    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    temporary = folder / f".tmp-{final.name}"  # the same name on every process (no pid)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if temporary.exists():  # left by a killed run
            shutil.rmtree(temporary)
        temporary.mkdir()
    dist.barrier()
    dcp.save(_state(student, optimizer), checkpoint_id=str(temporary))
    rng_file = temporary / f"rng-rank{rank}.pt"
    torch.save(_rng_as_tensors(rng_state()), rng_file)
    for own in [rng_file, *temporary.glob(f"__{rank}_*.distcp")]:
        fsync_file(own)
    dist.barrier()
    if rank == 0:
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        state = {"step": step, "format": "torch.distributed.checkpoint", "world_size": dist.get_world_size(), **extra}
        (temporary / "state.json").write_text(json.dumps(state, indent=2))
        for name in ("scheduler.pt", "state.json", METADATA):
            fsync_file(temporary / name)
        fsync_dir(temporary)
        if final.exists():  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_dir(folder)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


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
