"""Interchange interventions: run a model with one block's outputs swapped in from other inputs.

`LayerSwap` runs a transformer body (`model.base_model`) with a forward hook on
block `layer`: the block's output at the given token positions of each row is
replaced by `source` vectors (usually the same block's output on another row), and
the run goes on from there. The result is the body's final hidden states, so a
fused LM-head loss can take them. Gradients flow to the body and to `source`.

Why not pyvene (the intervention library of the causal-distillation authors)? It
installs with our pins and swaps correctly (tests/recipes/test_mode_interchange.py
checks our swap against it when it is installed), but pyvene 0.1.8 removes every
forward hook of the wrapped model after each call, which deletes the hooks
transformers 5 uses to record hidden states and attentions: later
`output_hidden_states=True` calls silently return empty tuples. It also pulls in
IPython, plotnine and statsmodels. A hook is all an interchange needs.

    python -c "from alambic.models.interventions import LayerSwap"
"""

from __future__ import annotations

import torch

from alambic.models.student import find_layer_list


class LayerSwap:
    """`body` run with block `layer`'s output at `positions` replaced by `source` vectors."""

    def __init__(self, body: torch.nn.Module, layer: int):
        self.body = body
        self.block = find_layer_list(body)[2][layer]
        self.layer = layer

    def __call__(self, inputs: dict, positions: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """inputs: the body's keyword inputs; positions [B, k]; source [B, k, H] -> hidden [B, L, H]."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

        def swap(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.index_put((rows, positions), source.to(hidden.dtype))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = self.block.register_forward_hook(swap)
        try:
            return self.body(**inputs, use_cache=False).last_hidden_state
        finally:
            handle.remove()


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states [B, L, H], positions [B, k] -> [B, k, H]."""
    return states.gather(1, positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def model_inputs(batch: dict) -> dict:
    """The body's inputs for a collated batch (packed rows carry position_ids instead of a mask)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def choose_sources(batch_size: int, pairing: str, generator: torch.Generator) -> torch.Tensor:
    """Row index of each base row's source: the next row (shift) or a random cyclic shift (shuffle)."""
    offset = 1
    if pairing == "shuffle" and batch_size > 2:
        offset = int(torch.randint(1, batch_size, (1,), generator=generator))
    return (torch.arange(batch_size) + offset) % batch_size


def choose_positions(valid: torch.Tensor, spec, count: int, generator: torch.Generator) -> torch.Tensor | None:
    """[B, k] positions valid in both base and source rows (valid: [B, L] bool), or None if there are none.

    spec 'random': k distinct random positions per row, k = min(count, the fewest valid positions of a
    row); a list: those positions that are valid in every row.
    """
    if spec == "random":
        k = min(count, int(valid.sum(1).min()))
        if k < 1:
            return None
        return torch.multinomial(valid.float().cpu(), k, replacement=False, generator=generator).sort(1).values
    fixed = [p for p in spec if p < valid.shape[1] and bool(valid[:, p].all())]
    if not fixed:
        return None
    return torch.tensor(fixed, dtype=torch.long).expand(valid.shape[0], -1).clone()


def affected_positions(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L-1] next-token positions that carry a label and come at or after the row's first swap."""
    shifted = labels[:, 1:] != -100
    index = torch.arange(shifted.shape[1], device=labels.device)
    first = positions.min(1).values.to(labels.device)
    return shifted & (index[None, :] >= first[:, None])
