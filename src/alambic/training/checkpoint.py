"""Atomic, resumable checkpoints.

A checkpoint is a folder `checkpoints/step-000123/` written under a temporary
name, every file fsynced, then renamed into place: a run killed at any moment
leaves either the previous checkpoints or the new one complete, never a torn
one. Weights are safetensors; optimizer/scheduler/RNG states are loaded with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from alambic.durable import atomic_dir

CHECKPOINT_PREFIX = "step-"


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.exists():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(run_dir: Path, step: int, module, optimizer, scheduler, extra: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the last `keep_last`."""
    final = Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    # Re-saving a step after a resume replaces it whole.
    with atomic_dir(final) as temporary:
        save_model(module, str(temporary / "model.safetensors"))
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        torch.save(_rng_as_tensors(rng_state()), temporary / "rng.pt")
        (temporary / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_as_tensors(state: dict) -> dict:
    """weights_only loading accepts tensors and plain containers, not numpy arrays."""
    python_state = state["python"]
    numpy_state = state["numpy"]
    converted = {
        "torch": state["torch"],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    if "cuda" in state:
        converted["cuda"] = state["cuda"]
    return converted


def _rng_from_tensors(saved: dict) -> dict:
    python_state = saved["python"]
    numpy_state = saved["numpy"]
    state = {
        "torch": saved["torch"],
        "python": (python_state[0], tuple(python_state[1]), python_state[2]),
        "numpy": (numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:]),
    }
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


def load_checkpoint(path: Path, module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return state.json's content."""
    path = Path(path)
    load_model(module, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    restore_rng_state(_rng_from_tensors(torch.load(path / "rng.pt", weights_only=True)))
    return json.loads((path / "state.json").read_text())
