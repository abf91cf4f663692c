"""Width pruning of BERT-family encoders (heads, MLP channels, hidden channels), ranked by activation importance.

The same Minitron-style ranking as the decoder pruning (models/pruning.py), measured
with the model itself on calibration text:

- an attention head: mean |output| of the head (the input of attention.output.dense);
- an MLP channel: mean |activation| (the input of output.dense);
- a hidden channel: mean |output| of every LayerNorm (embeddings and each layer), summed.

Hugging Face's BERT ties the attention width to the hidden size (head size = hidden /
heads), so the kept heads times the teacher's head size must equal the kept hidden
size: give one of heads_keep / hidden_keep and the other follows. The pooler and the
classification head are kept (their hidden rows / columns sliced like every other
matrix). Weights are sliced into a freshly built model of the smaller config, so the
result is a plain transformers model.

    alambic init-student configs/init_student_classifier.yaml
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from alambic.errors import ModelError

SUPPORTED_TYPES = ("bert",)


@dataclass
class EncoderWidth:
    heads: list[list[int]]  # kept heads per layer
    mlp: list[list[int]]  # kept intermediate channels per layer
    hidden: list[int]  # kept hidden channels (all layers)


def check_bert(model) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED_TYPES or not hasattr(model, "bert"):
        raise ModelError(f"width pruning of encoders supports BERT models (model_type bert); this is a "
                         f"{type(model).__name__} (model_type {kind})",
                         "use method: select or average (they keep the width), or a BERT-family teacher")


def _count(keep, total: int, what: str) -> int:
    if keep is None:
        return total
    count = max(1, round(keep * total)) if isinstance(keep, float) else int(keep)
    if not 1 <= count <= total:
        raise ModelError(f"cannot keep {count} {what} of {total}", f"choose 1..{total} (or a fraction)")
    return count


def width_counts(config, heads_keep, mlp_keep, hidden_keep) -> tuple[int, int, int]:
    """(heads, intermediate, hidden) the student keeps; heads x head size must equal hidden in HF BERT."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_size = hidden // heads
    n_heads = _count(heads_keep, heads, "attention heads") if heads_keep is not None else None
    n_hidden = _count(hidden_keep, hidden, "hidden channels") if hidden_keep is not None else None
    if n_heads is None and n_hidden is not None:
        if n_hidden % head_size:
            raise ModelError(f"hidden_keep {n_hidden} is not a multiple of the head size {head_size}",
                             f"BERT's attention width equals its hidden size: keep a multiple of {head_size}")
        n_heads = n_hidden // head_size
    n_heads = n_heads or heads
    n_hidden = n_hidden if n_hidden is not None else n_heads * head_size
    if n_heads * head_size != n_hidden:
        raise ModelError(f"{n_heads} heads of size {head_size} give an attention width of {n_heads * head_size}, "
                         f"but hidden_keep is {n_hidden}",
                         "in BERT the two must match: give only one of heads_keep / hidden_keep")
    return n_heads, _count(mlp_keep, config.intermediate_size, "MLP channels"), n_hidden


@torch.no_grad()
def encoder_importance(model, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([layers, heads], [layers, intermediate], [hidden]) mean |activation| over the calibration tokens."""
    check_bert(model)
    layers = model.bert.encoder.layer
    cfg = model.config
    heads = torch.zeros(len(layers), cfg.num_attention_heads)
    mlp = torch.zeros(len(layers), cfg.intermediate_size)
    hidden = torch.zeros(cfg.hidden_size)
    state = {"mask": None, "tokens": 0}
    hooks = []

    def masked_abs(tensor):
        mask = state["mask"].to(tensor.dtype)[..., None]
        return (tensor.abs().float() * mask).sum(dim=(0, 1)).cpu()

    for i, layer in enumerate(layers):
        def on_heads(module, args, i=i):
            per_dim = masked_abs(args[0])
            heads[i] += per_dim.view(cfg.num_attention_heads, -1).mean(-1)

        def on_mlp(module, args, i=i):
            mlp[i] += masked_abs(args[0])

        hooks.append(layer.attention.output.dense.register_forward_pre_hook(on_heads))
        hooks.append(layer.output.dense.register_forward_pre_hook(on_mlp))
    def on_norm(module, args, output) -> None:  # returning None keeps the module's output
        hidden.add_(masked_abs(output))

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            hooks.append(module.register_forward_hook(on_norm))
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"]
            state["tokens"] += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    tokens = max(state["tokens"], 1)
    return heads / tokens, mlp / tokens, hidden / tokens


def plan_encoder_width(model, importance, heads_keep, mlp_keep, hidden_keep) -> EncoderWidth:
    n_heads, n_mlp, n_hidden = width_counts(model.config, heads_keep, mlp_keep, hidden_keep)
    head_scores, mlp_scores, hidden_scores = importance

    def top(scores: torch.Tensor, k: int) -> list[int]:
        return sorted(scores.topk(k).indices.tolist())

    return EncoderWidth([top(s, n_heads) for s in head_scores], [top(s, n_mlp) for s in mlp_scores],
                        top(hidden_scores, n_hidden))


def _dims(name: str, shape: tuple, attention: list[int], mlp: list[int], hidden: list[int]):
    """Index lists for each dimension of parameter `name` (None = keep the whole dimension)."""
    vector = len(shape) == 1
    if ".attention.self." in name:  # query / key / value: [attention, hidden]
        return (attention,) if vector else (attention, hidden)
    if ".attention.output.dense" in name:  # [hidden, attention]
        return (hidden,) if vector else (hidden, attention)
    if ".intermediate.dense" in name:  # [mlp, hidden]
        return (mlp,) if vector else (mlp, hidden)
    if ".output.dense" in name:  # [hidden, mlp]
        return (hidden,) if vector else (hidden, mlp)
    if "LayerNorm" in name:
        return (hidden,)
    if "embeddings." in name:  # word / position / token type: [rows, hidden]
        return (None, hidden)
    if "pooler.dense" in name:  # [hidden, hidden]
        return (hidden,) if vector else (hidden, hidden)
    if name.startswith("classifier."):  # [classes, hidden]
        return (None,) if vector else (None, hidden)
    return tuple(None for _ in shape)


def _layer_of(name: str) -> int | None:
    marker = "encoder.layer."
    if marker not in name:
        return None
    return int(name.split(marker, 1)[1].split(".", 1)[0])


@torch.no_grad()
def prune_encoder_width(model, plan: EncoderWidth):
    """A new, narrower model of the same class with the planned heads / channels sliced in."""
    check_bert(model)
    cfg = model.config
    head_size = cfg.hidden_size // cfg.num_attention_heads
    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_attention_heads = len(plan.heads[0])
    new_cfg.intermediate_size = len(plan.mlp[0])
    new_cfg.hidden_size = len(plan.hidden)
    student = type(model)(new_cfg).to(next(model.parameters()).dtype)
    source = model.state_dict()
    target = student.state_dict()
    for name, tensor in source.items():
        if name not in target or not tensor.is_floating_point():  # position-id buffers stay as they are
            continue
        layer = _layer_of(name)
        attention = mlp = None
        if layer is not None:
            attention = [h * head_size + d for h in plan.heads[layer] for d in range(head_size)]
            mlp = plan.mlp[layer]
        value = tensor
        for dim, keep in enumerate(_dims(name, tuple(tensor.shape), attention, mlp, plan.hidden)):
            if keep is not None:
                value = value.index_select(dim, torch.tensor(keep, dtype=torch.long, device=value.device))
        if tuple(value.shape) != tuple(target[name].shape):
            raise ModelError(f"width pruning: {name} sliced to {tuple(value.shape)}, the student expects "
                             f"{tuple(target[name].shape)}")
        target[name].copy_(value)
    student.load_state_dict(target)
    student.config.alambic_width = {"heads": new_cfg.num_attention_heads, "intermediate": new_cfg.intermediate_size,
                                    "hidden": new_cfg.hidden_size}
    return student.eval()
