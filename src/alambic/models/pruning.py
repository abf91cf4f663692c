"""Width pruning of Llama-style decoders, ranked by activation importance (Minitron-style).

Importance is measured on calibration text with the teacher itself (Muralidharan
et al., 2024, "Compact Language Models via Pruning and Knowledge Distillation"):

- an attention head: mean |output| of the head (the input of o_proj, per head)
  over the calibration tokens;
- an MLP channel: mean |activation| of the intermediate channel (the input of
  down_proj);
- a hidden (embedding) channel: mean |output| of every RMSNorm, summed.

Every layer keeps the same number of heads / channels (the HF config is global)
but each layer keeps its own most important ones. Weights are sliced from the
teacher's state dict into a freshly built model of the smaller config, so the
result is a plain transformers model (save_pretrained, from_pretrained).

Grouped-query attention stays consistent in one of two ways (`gqa`):
- "within_groups": every KV head is kept and each group keeps its most
  important query heads (the same number per group);
- "whole_groups": whole KV groups (a KV head and all its query heads) are
  ranked by their summed query-head importance and dropped together.
With one query head per KV head (plain multi-head attention) only whole groups
can be pruned, which is what "auto" picks; otherwise "auto" prunes within groups.

    alambic init-student configs/init_student.yaml
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from alambic.errors import ModelError

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class Importance:
    """Mean |activation| per unit over `tokens` calibration tokens."""

    heads: torch.Tensor  # [layers, query heads]
    mlp: torch.Tensor  # [layers, intermediate channels]
    hidden: torch.Tensor  # [hidden channels]
    tokens: int


@dataclass
class WidthPlan:
    """Which units every layer keeps (indices into the teacher's, increasing)."""

    query_heads: list[list[int]]
    kv_heads: list[list[int]]
    mlp_channels: list[list[int]]
    hidden_channels: list[int]


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(state-dict prefix, layers) of a Llama-style decoder, or a clear error."""
    from alambic.models.student import find_layer_list

    _, _, layers = find_layer_list(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    for layer in layers:
        missing = [name for name in (*ATTENTION, *MLP) if _submodule(layer, name) is None]
        if missing:
            raise ModelError(
                f"width pruning supports Llama-style decoders (q/k/v/o and gate/up/down projections); "
                f"a {type(model).__name__} layer has no {', '.join(missing)}",
                "use method: select or average for this model (they keep the width)",
            )
    return prefix, layers


def _submodule(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _norm_modules(model) -> list[torch.nn.Module]:
    hidden = model.config.hidden_size
    return [
        module for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None
        and module.weight.shape == (hidden,)
    ]


@torch.no_grad()
def activation_importance(model, batches) -> Importance:
    """Run `model` on calibration batches ({input_ids, attention_mask}) and collect importances."""
    _, layers = decoder_layers(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = torch.zeros(len(layers), config.num_attention_heads)
    mlp = torch.zeros(len(layers), config.intermediate_size)
    hidden = torch.zeros(config.hidden_size)
    state = {"mask": None}

    def masked_abs_sum(tensor: torch.Tensor) -> torch.Tensor:
        mask = state["mask"].to(tensor.dtype)[..., None]
        return (tensor.abs() * mask).sum(dim=(0, 1)).float().cpu()

    def on_attention(index):
        def hook(module, args):
            heads[index] += masked_abs_sum(args[0]).view(-1, head_dim).mean(-1)
        return hook

    def on_mlp(index):
        def hook(module, args):
            mlp[index] += masked_abs_sum(args[0])
        return hook

    def on_norm(module, args, output):
        hidden.add_(masked_abs_sum(output))

    handles = []
    for index, layer in enumerate(layers):
        handles.append(_submodule(layer, "self_attn.o_proj").register_forward_pre_hook(on_attention(index)))
        handles.append(_submodule(layer, "mlp.down_proj").register_forward_pre_hook(on_mlp(index)))
    handles += [norm.register_forward_hook(on_norm) for norm in _norm_modules(model)]
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            tokens += int(state["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ModelError("the calibration data has no tokens", "give calibration texts (data.calibration)")
    return Importance(heads / tokens, mlp / tokens, hidden / tokens, tokens)


def resolve_keep(value: int | float | None, total: int, what: str) -> int:
    """A count (int >= 1) or a fraction (float in (0, 1]) of `total` units -> a count."""
    if value is None:
        return total
    count = max(1, round(value * total)) if isinstance(value, float) else int(value)
    if not 1 <= count <= total:
        raise ModelError(f"cannot keep {count} of the teacher's {total} {what}", f"choose 1..{total} or a fraction in (0, 1]")
    return count


def _top(scores: torch.Tensor, count: int) -> list[int]:
    # Stable: ties keep the earlier unit, so pruning is deterministic.
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


def plan_heads(head_scores: torch.Tensor, num_kv_heads: int, keep: int, gqa: str) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) one layer keeps."""
    num_heads = head_scores.shape[0]
    group = num_heads // num_kv_heads
    mode = ("whole_groups" if group == 1 else "within_groups") if gqa == "auto" else gqa
    if mode == "within_groups":
        if keep % num_kv_heads:
            valid = ", ".join(str(num_kv_heads * k) for k in range(1, group + 1))
            raise ModelError(
                f"keeping {keep} query heads within {num_kv_heads} KV groups needs a multiple of {num_kv_heads}",
                f"set width.heads_keep to one of {valid}, or width.gqa: whole_groups",
            )
        per_group = keep // num_kv_heads
        queries = []
        for kv in range(num_kv_heads):
            members = list(range(kv * group, (kv + 1) * group))
            queries += [members[i] for i in _top(head_scores[members], per_group)]
        return queries, list(range(num_kv_heads))
    if keep % group:
        raise ModelError(
            f"pruning whole KV groups of {group} query heads cannot keep {keep} query heads",
            f"set width.heads_keep to a multiple of {group}, or width.gqa: within_groups",
        )
    group_scores = head_scores.view(num_kv_heads, group).sum(-1)
    kept_groups = _top(group_scores, keep // group)
    return [kv * group + q for kv in kept_groups for q in range(group)], kept_groups


def plan_width(model, importance: Importance, heads_keep=None, mlp_keep=None, hidden_keep=None, gqa="auto") -> WidthPlan:
    config = model.config
    heads = resolve_keep(heads_keep, config.num_attention_heads, "attention heads")
    channels = resolve_keep(mlp_keep, config.intermediate_size, "MLP channels")
    hidden = resolve_keep(hidden_keep, config.hidden_size, "hidden channels")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    queries, kvs, mlp = [], [], []
    for layer_scores, channel_scores in zip(importance.heads, importance.mlp):
        layer_queries, layer_kvs = plan_heads(layer_scores, kv_heads, heads, gqa)
        queries.append(layer_queries)
        kvs.append(layer_kvs)
        mlp.append(_top(channel_scores, channels))
    return WidthPlan(queries, kvs, mlp, _top(importance.hidden, hidden))


def _unit_rows(units: list[int], size: int) -> torch.Tensor:
    """Rows of a projection that belong to the kept heads (each head owns `size` consecutive rows)."""
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


def _slice(tensor: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    if rows is not None:
        tensor = tensor.index_select(0, rows.to(tensor.device))
    if cols is not None and tensor.dim() > 1:
        tensor = tensor.index_select(1, cols.to(tensor.device))
    return tensor.clone()


def _layer_rules(plan: WidthPlan, index: int, head_dim: int, hidden: torch.Tensor) -> dict:
    """(rows, cols) to keep for each projection of layer `index`."""
    query_rows = _unit_rows(plan.query_heads[index], head_dim)
    kv_rows = _unit_rows(plan.kv_heads[index], head_dim)
    channels = torch.tensor(plan.mlp_channels[index])
    return {
        "self_attn.q_proj": (query_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, query_rows),
        "mlp.gate_proj": (channels, hidden),
        "mlp.up_proj": (channels, hidden),
        "mlp.down_proj": (hidden, channels),
    }


def pruned_config(config, plan: WidthPlan):
    new = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    new.head_dim = head_dim  # stays the teacher's, whatever the new hidden size and head count
    new.num_attention_heads = len(plan.query_heads[0])
    new.num_key_value_heads = len(plan.kv_heads[0])
    new.intermediate_size = len(plan.mlp_channels[0])
    new.hidden_size = len(plan.hidden_channels)
    return new


def prune_width(model, plan: WidthPlan):
    """A new model of the same class with only the planned heads / channels (weights copied)."""
    prefix, layers = decoder_layers(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = torch.tensor(plan.hidden_channels)
    rules = {}
    for index in range(len(layers)):
        for name, (rows, cols) in _layer_rules(plan, index, head_dim, hidden).items():
            rules[f"{prefix}.{index}.{name}.weight"] = (rows, cols)
            rules[f"{prefix}.{index}.{name}.bias"] = (rows, None)
    embeddings = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied heads appear under two names
        if any(parameter is weight for weight in embeddings):
            rules[name] = (None, hidden)
    new_state = {}
    for name, tensor in model.state_dict().items():
        rows, cols = rules.get(name, (None, None))
        if name not in rules and tensor.dim() == 1 and tensor.shape[0] == config.hidden_size:
            rows = hidden  # RMSNorm weights and output biases live on the hidden channels
        new_state[name] = _slice(tensor, rows, cols)
    student = type(model)(pruned_config(config, plan)).to(next(model.parameters()).dtype)
    try:
        student.load_state_dict(new_state, strict=True)
    except RuntimeError as err:
        raise ModelError(
            f"width pruning does not know every weight of a {type(model).__name__}: {str(err)[:300]}",
            "prune only Llama-style decoders (Llama, Mistral, Qwen2, ...) or use method: select / average",
        ) from None
    return student.eval()
