"""Merge students of one recipe (several seeds or hyperparameters) into one model, with mergekit.

Methods: `linear` (weighted mean of the weights, "model soups"), `slerp` (spherical
interpolation of two models at `t`), `ties` (TIES-merging: each model's change from
a `base` — e.g. the students' common initialisation — trimmed to its largest
`density` share, signs elected, then averaged and added back to the base).
Before anything is written the models must share their architecture (the same
tensor names and shapes) and their tokenizer; the output is written atomically
with the tokenizer, loadable with `from_pretrained`.

    alambic merge runs/seed0 runs/seed1 runs/seed2 --method linear --output runs/merged
    alambic merge --config configs/merge.yaml
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alambic.config_base import Strict
from alambic.durable import atomic_dir
from alambic.errors import ConfigError, ModelError

INSTALL_HINT = "pip install 'alambic[merge]' (mergekit)"


class MergeConfig(Strict):
    """`alambic merge`: several models of one architecture and tokenizer -> one."""

    models: list[str] = Field(..., min_length=1, description="model folders or run folders (their final/ is used)")
    method: Literal["linear", "slerp", "ties"] = "linear"
    output: str = "runs/merged"
    base: str | None = Field(None, description="ties: the common starting point (e.g. the students' init); "
                             "slerp: the model at t = 0 (default: the first model)")
    weights: list[float] | None = Field(None, description="linear / ties: one weight per model (default: equal)")
    t: float = Field(0.5, ge=0.0, le=1.0, description="slerp: 0 = base, 1 = the other model")
    density: float = Field(0.5, gt=0.0, le=1.0, description="ties: share of each model's changes kept")

    @model_validator(mode="after")
    def _consistent(self) -> "MergeConfig":
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.models)} models")
        if self.method == "ties" and self.base is None:
            raise ValueError("method 'ties' merges changes from a base: set base (e.g. the students' initial model)")
        if self.method == "slerp" and len(self.models) + (self.base is not None) != 2:
            raise ValueError("method 'slerp' interpolates exactly two models: give two models, or one model and base")
        return self


def resolve_model(path: str, key: str) -> Path:
    """A model folder, or a run folder's final/ model."""
    folder = Path(path)
    if (folder / "final" / "config.json").is_file():
        folder = folder / "final"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key} {path!r} is neither a model folder (config.json) nor a run folder (final/)",
                          "give a folder written by save_pretrained or an `alambic distill` run folder")
    return folder


def tensor_shapes(folder: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no safetensors weights", "merge models saved with safetensors")
    shapes = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes


def _architecture(folder: Path) -> tuple:
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type"), tuple(config.get("architectures") or ()), config.get("quantization_config")


def _vocabulary(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder} has no readable tokenizer ({err})", "save the tokenizer next to each model") from None
    return tokenizer.get_vocab(), tokenizer.all_special_tokens


def check_mergeable(folders: list[Path]) -> None:
    """Same architecture, tensor shapes and tokenizer, or a ModelError naming the first difference."""
    reference, first = folders[0], None
    for folder in folders:
        if _architecture(folder)[2] is not None:
            raise ModelError(f"{folder} is a quantized model", "merge the floating-point models, then quantize")
    for folder in folders[1:]:
        if _architecture(folder)[:2] != _architecture(reference)[:2]:
            raise ModelError(f"{folder} is a {_architecture(folder)[:2]} and {reference} a "
                             f"{_architecture(reference)[:2]}: different architectures cannot be merged",
                             "merge students of one recipe (same architecture and size)")
        first = first or tensor_shapes(reference)
        shapes = tensor_shapes(folder)
        if shapes != first:
            differing = sorted(set(shapes) ^ set(first)) or sorted(k for k in shapes if shapes[k] != first[k])
            raise ModelError(f"{folder} and {reference} have different weights (e.g. {differing[0]}): "
                             "different architectures or sizes cannot be merged",
                             "merge students of one recipe (same architecture and size)")
        if _vocabulary(folder) != _vocabulary(reference):
            raise ModelError(f"{folder} and {reference} use different tokenizers",
                             "merge only students that share one tokenizer")


def unique_models(folders: list[Path], weights: list[float] | None) -> tuple[list[Path], list[float]]:
    """The same folder given twice is one model with the summed weight (mergekit refuses duplicates)."""
    merged: dict[Path, float] = {}
    for folder, weight in zip(folders, weights or [1.0] * len(folders)):
        key = folder.resolve()
        merged[key] = merged.get(key, 0.0) + weight
    return list(merged), list(merged.values())


def mergekit_config(config: MergeConfig, folders: list[Path], base: Path | None) -> dict:
    unique, weights = unique_models(folders, config.weights)
    if config.method == "slerp":
        start = (base or folders[0]).resolve()
        others = [f for f in unique if f != start]
        if others:
            return {"merge_method": "slerp", "base_model": str(start), "dtype": "float32",
                    "parameters": {"t": config.t}, "models": [{"model": str(start)}, {"model": str(others[0])}]}
        unique, weights = [start], [1.0]  # slerp of a model with itself
    models = [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(unique, weights)]
    if config.method == "ties":
        for entry in models:
            entry["parameters"]["density"] = config.density
        return {"merge_method": "ties", "base_model": str(base.resolve()), "dtype": "float32", "models": models,
                "parameters": {"normalize": True}}
    return {"merge_method": "linear", "dtype": "float32", "models": models, "parameters": {"normalize": True}}


def merge_models(config: MergeConfig, overwrite: bool = False) -> Path:
    """Check, merge with mergekit into a temporary sibling folder, then publish it as `config.output`."""
    output = Path(config.output)
    if output.exists() and not overwrite:
        raise ConfigError(f"output folder {output} already exists", "pass --overwrite or choose another output")
    folders = [resolve_model(m, "model") for m in config.models]
    base = resolve_model(config.base, "base") if config.base else None
    check_mergeable(folders + ([base] if base else []))
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise ConfigError("alambic merge needs the mergekit package", INSTALL_HINT) from None
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # mergekit passes transformers a deprecated argument
    try:
        with atomic_dir(output) as temporary, contextlib.redirect_stdout(io.StringIO()):
            run_merge(MergeConfiguration.model_validate(mergekit_config(config, folders, base)), str(temporary),
                      options=MergeOptions(copy_tokenizer=True, lazy_unpickle=False, quiet=True, device="cpu"))
    finally:
        hf_logging.set_verbosity(verbosity)
    return output
