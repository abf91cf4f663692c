"""Atomic, resumable checkpoints.

A checkpoint is a folder `checkpoints/step-000123/` written under a temporary
name, every file fsynced, then renamed into place: a run killed at any moment
leaves either the previous checkpoints or the new one complete, never a torn
one. Weights are safetensors; optimizer/scheduler/RNG states are loaded with
`torch.load(weights_only=True)`.

Each checkpoint also records the size and SHA-256 of its files
(`checksums.json`). A checkpoint damaged after it was written (a truncated
file, a bad disk, a hand edit) fails that check on resume, and the run falls
back to the newest checkpoint that passes, saying which one it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from alambic.durable import atomic_dir
from alambic.training.finite import check_finite_weights

CHECKPOINT_PREFIX = "step-"
CHECKSUMS = "checksums.json"


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
    done = [
        p for p in folder.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "state.json").exists()
    ]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(run_dir: Path, step: int, module, optimizer, scheduler, extra: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the last `keep_last`."""
    check_finite_weights(module, f"checkpoint at step {step}")  # a non-finite model is never saved as "good"
    final = Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    # Re-saving a step after a resume replaces it whole.
    with atomic_dir(final) as temporary:
        save_model(module, str(temporary / "model.safetensors"))
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        torch.save(_rng_as_tensors(rng_state()), temporary / "rng.pt")
        (temporary / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        (temporary / CHECKSUMS).write_text(json.dumps(_checksums(temporary), indent=2))
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict:
    return {
        child.name: {"bytes": child.stat().st_size, "sha256": _sha256(child)}
        for child in sorted(folder.iterdir()) if child.is_file() and child.name != CHECKSUMS
    }


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it is intact."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "state.json has no integer step"
    except (OSError, ValueError) as err:
        return f"state.json cannot be read ({type(err).__name__})"
    if not (path / CHECKSUMS).exists():
        return None  # written before checksums were recorded: nothing to verify against
    try:
        expected = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{CHECKSUMS} cannot be read ({type(err).__name__})"
    for name, entry in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, {entry.get('bytes')} were written"
        if _sha256(file) != entry.get("sha256"):
            return f"{name} does not match the checksum recorded when it was written"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are named on stderr and skipped."""
    from alambic.errors import ConfigError

    checkpoints = list_checkpoints(run_dir)
    damaged = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                print(f"warning: checkpoint {bad} is damaged ({why}); resuming from {path.name} instead",
                      file=sys.stderr)
            return path
        damaged.append((path, problem))
    if damaged:
        listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise ConfigError(
            f"every checkpoint in {str(Path(run_dir) / 'checkpoints')!r} is damaged ({listing})",
            "pass --overwrite to train again from the start, or restore the checkpoints from a backup",
        )
    return None
