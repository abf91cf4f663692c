"""The run folder: what it holds, and whether a new run may use it.

A folder that holds a different run is never overwritten silently: the user
says --resume (continue it with this config) or --overwrite (start again).
The same config with checkpoints present resumes automatically.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from alambic.config import DistillConfig, dump_config
from alambic.durable import atomic_write_text
from alambic.errors import ConfigError
from alambic.redact import redact_tree
from alambic.training.checkpoint import latest_valid_checkpoint
from alambic.training.run_lock import clear_folder, folder_is_empty, remove_stale_temporaries

# Keys that do not change what a run computes, so changing them is not "a different run".
COSMETIC_KEYS = {("train", "progress"), ("train", "max_steps"), ("train", "eval_every"), ("train", "trackers"),
                 ("train", "nonfinite_skips")}


def _comparable(config_dict: dict) -> dict:
    copy = yaml.safe_load(yaml.safe_dump(config_dict))
    rollout = copy.get("rollout")
    if isinstance(rollout, dict) and "lambda_" in rollout:  # saved before keys were written by their alias
        rollout["lambda"] = rollout.pop("lambda_")
    for section, key in COSMETIC_KEYS:
        copy.get(section, {}).pop(key, None)
    return copy


def _is_run_config(path: Path) -> bool:
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"student", "data", "train"} <= set(saved)


def inspect_run_dir(config: DistillConfig, overwrite: bool, resume: bool) -> Path | None:
    """Decide, without writing anything, whether the run may use its folder.

    Returns the checkpoint to resume from, or None for a fresh start.
    """
    run_dir = Path(config.train.output_dir)
    if overwrite or folder_is_empty(run_dir):
        return None
    if folder_is_empty(run_dir, ignore=("config.yaml",)) and _is_run_config(run_dir / "config.yaml"):
        return None  # only the config of a run that stopped before its first step: nothing to keep
    saved_config = run_dir / "config.yaml"
    if not saved_config.exists():
        raise ConfigError(
            f"output folder {str(run_dir)!r} is not empty and holds no alambic run",
            "choose another train.output_dir, or pass --overwrite to delete its contents",
        )
    previous = yaml.safe_load(saved_config.read_text()) or {}
    same = _comparable(previous) == _comparable(redact_tree(config.model_dump(mode="json", by_alias=True)))  # as saved
    if not same and not resume:
        raise ConfigError(
            f"output folder {str(run_dir)!r} already holds a different run (its config.yaml differs)",
            "pass --resume to continue that run with this config, --overwrite to start again, "
            "or choose another train.output_dir",
        )
    checkpoint = latest_valid_checkpoint(run_dir)
    if checkpoint is not None:
        return checkpoint
    if (run_dir / "final").exists() and not resume:
        raise ConfigError(
            f"output folder {str(run_dir)!r} already holds a finished run with no checkpoint to resume",
            "pass --overwrite to train again, or choose another train.output_dir",
        )
    return None


def create_run_dir(config: DistillConfig, overwrite: bool) -> Path:
    """Called once models and data loaded fine, so a bad input leaves no folder behind."""
    run_dir = Path(config.train.output_dir)
    if overwrite and run_dir.exists():
        clear_folder(run_dir)  # keeps the lock this run holds
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)  # left by a run killed mid-write; the lock says none is live
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    return run_dir
