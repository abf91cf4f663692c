"""Build a shallower student from its teacher by keeping some of its layers (DistilBERT-style init).

The student is a deep copy of the teacher with only the chosen transformer
blocks: embeddings, final norm and heads are kept as they are, so a student
that keeps every layer computes exactly what the teacher computes. Works for
BERT-family encoders (BERT, RoBERTa, DistilBERT, ...) and Llama/GPT-2-style
decoders.

    python -c "from alambic.models.student import layer_indices_for as f; print(f(6, 2), f(12, 6, 'every_k'))"
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from alambic.errors import ModelError

# Where the list of transformer blocks lives, by family (the first that exists wins).
LAYER_LIST_PATHS = (
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "electra.encoder.layer",
    "encoder.layer",  # a bare BertModel / RobertaModel
    "distilbert.transformer.layer",
    "transformer.layer",  # a bare DistilBertModel
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, ...
    "layers",  # a bare LlamaModel
    "transformer.h",  # GPT-2, GPT-J
    "h",  # a bare GPT2Model
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
)
DEPTH_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "n_layers")


def layer_indices_for(
    total: int, keep: int | None = None, strategy: str | Sequence[int] = "uniform", every_k: int | None = None
) -> list[int]:
    """Which teacher layers a student of `keep` layers starts from.

    - "uniform": the last layer of each of `keep` equal segments, so the top
      layer is always kept (TinyBERT's uniform mapping: student layer m <- teacher layer m * total / keep).
    - "every_k": layers 0, k, 2k, ... (DistilBERT takes every other layer); k defaults to total // keep.
    - a list: those layers, checked.
    """
    if not isinstance(strategy, str):
        indices = [int(i) for i in strategy]
    elif strategy == "uniform":
        if keep is None:
            raise ModelError("layer strategy 'uniform' needs the number of layers to keep", "set num_layers")
        _check_keep(total, keep)
        indices = [math.ceil((m + 1) * total / keep) - 1 for m in range(keep)]
    elif strategy == "every_k":
        if every_k is None:
            if keep is None:
                raise ModelError("layer strategy 'every_k' needs every_k or num_layers", "set every_k: 2")
            _check_keep(total, keep)
            every_k = total // keep
        indices = list(range(0, total, every_k))[: keep or None]
    else:
        raise ModelError(f"unknown layer strategy {strategy!r}", "use 'uniform', 'every_k' or a list of layer indices")
    _check_indices(indices, total)
    return indices


def _check_keep(total: int, keep: int) -> None:
    if not 1 <= keep <= total:
        raise ModelError(f"cannot keep {keep} of the teacher's {total} layers", f"choose between 1 and {total}")


def _check_indices(indices: list[int], total: int) -> None:
    if not indices:
        raise ModelError("the student must keep at least one layer", "give one or more layer indices")
    if any(not 0 <= i < total for i in indices):
        raise ModelError(f"layer indices {indices} out of range for a {total}-layer teacher", f"use 0..{total - 1}")
    if sorted(set(indices)) != indices:
        raise ModelError(f"layer indices {indices} must be increasing without repeats", "sort them, e.g. [0, 2, 4]")


def find_layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent module, attribute name, the ModuleList of transformer blocks)."""
    for path in LAYER_LIST_PATHS:
        parent: object = model
        *parents, leaf = path.split(".")
        for part in parents:
            parent = getattr(parent, part, None)
        layers = getattr(parent, leaf, None) if parent is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            return parent, leaf, layers
    raise ModelError(
        f"cannot find the transformer layers of a {type(model).__name__}",
        "layer selection supports BERT-family encoders and Llama/GPT-2-style decoders",
    )


def select_layers(model: torch.nn.Module, layer_indices: Sequence[int]) -> torch.nn.Module:
    """A new model with only the given layers of `model` (weights copied; `model` is untouched)."""
    _, _, teacher_layers = find_layer_list(model)
    indices = [int(i) for i in layer_indices]
    _check_indices(indices, len(teacher_layers))
    student = copy.deepcopy(model)
    parent, name, layers = find_layer_list(student)
    setattr(parent, name, torch.nn.ModuleList([layers[i] for i in indices]))
    for new_index, layer in enumerate(getattr(parent, name)):
        # Decoders index their KV cache by the layer's position, which has changed.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    _update_config(student.config, indices, len(teacher_layers))
    return student


def _update_config(config, indices: list[int], teacher_depth: int) -> None:
    for key in DEPTH_CONFIG_KEYS:
        if key in config.to_dict() or key in getattr(config, "attribute_map", {}):
            setattr(config, key, len(indices))
    # Per-layer settings (sliding vs full attention, ...) follow the kept layers.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == teacher_depth:
        config.layer_types = [layer_types[i] for i in indices]
    config.alambic_selected_layers = list(indices)
