"""Helpers of config loading kept out of config.py: dotted overrides into nested mappings and lists,
and checks of settings that depend on what is installed.

    set_dotted(raw, ["stages", "1", "overrides", "train.max_steps"], 3)
"""

from __future__ import annotations

import importlib.util
from typing import Any

from alambic.errors import ConfigError

# The module each tracker needs, and the extra that installs it.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _index(node: list, part: str, where: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(
            f"override key {where!r}: {where.rsplit('.', 1)[0]!r} is a list, so the next part must be an index",
            f"number the element, e.g. {where.rsplit('.', 1)[0]}.0.<key>=...",
        )
    index = int(part)
    if not -len(node) <= index < len(node):
        raise ConfigError(
            f"override key {where!r}: index {index} is out of range (the list has {len(node)} elements)",
            f"use an index from 0 to {len(node) - 1}",
        )
    return index


def set_dotted(raw: dict, path: list[str], value: Any) -> None:
    """Set `value` at `path` in `raw`, creating mappings on the way; numeric parts index existing lists.

    A mapping whose keys are themselves dotted (a progressive stage's `overrides`)
    is reached like any other: `stages.1.overrides.train.max_steps=3` sets
    `{"train": {"max_steps": 3}}` there, which the stage applies after its own keys.
    """
    node: Any = raw
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 2])
        if isinstance(node, list):
            node = node[_index(node, part, where)]
            continue
        child = node.get(part)
        if isinstance(child, list):
            _index(child, path[depth + 1], ".".join(path[: depth + 2]))  # the next part must index it
            node = child
            continue
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def flatten_dotted(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{"train.lr": 1, "train": {"max_steps": 2}} -> [("train.lr", 1), ("train.max_steps", 2)], in order."""
    items = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += flatten_dotted(value, dotted + ".")
        else:
            items.append((dotted, value))
    return items


def check_trackers_installed(trackers: list[str]) -> list[str]:
    """A tracker whose package is missing would log nothing: refuse it when the config is read."""
    missing = [name for name in trackers if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
    if missing:
        raise ValueError(
            f"tracker {missing[0]!r} is not installed, so it would log nothing; "
            f"install it (pip install 'alambic[trackers]' or pip install {TRACKER_MODULES[missing[0]]}) "
            "or remove it from train.trackers"
        )
    return trackers
