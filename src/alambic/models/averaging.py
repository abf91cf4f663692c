"""Shallower students by averaging the weights of adjacent teacher layers.

Instead of dropping layers, each student layer is the element-wise mean of a
group of adjacent teacher layers (every parameter: attention, MLP, norms), so
every teacher layer contributes something. Groups are contiguous: `num_layers`
near-equal segments, or runs of `every_k` layers.

    python -c "from alambic.models.averaging import layer_groups as g; print(g(6, num_layers=4), g(6, every_k=2))"
"""

from __future__ import annotations

import torch

from alambic.errors import ModelError
from alambic.models.student import find_layer_list, select_layers


def layer_groups(total: int, num_layers: int | None = None, every_k: int | None = None) -> list[list[int]]:
    """Contiguous groups of teacher layers, one per student layer."""
    if every_k is not None:
        if not 1 <= every_k <= total:
            raise ModelError(f"cannot average runs of {every_k} of the teacher's {total} layers", f"choose 1..{total}")
        return [list(range(start, min(start + every_k, total))) for start in range(0, total, every_k)]
    if num_layers is None:
        raise ModelError("layer averaging needs num_layers or every_k", "set num_layers: 2 (or every_k: 2)")
    if not 1 <= num_layers <= total:
        raise ModelError(f"cannot average the teacher's {total} layers into {num_layers}", f"choose 1..{total}")
    bounds = [round(m * total / num_layers) for m in range(num_layers + 1)]
    return [list(range(bounds[m], bounds[m + 1])) for m in range(num_layers)]


@torch.no_grad()
def average_layers(model: torch.nn.Module, groups: list[list[int]]) -> torch.nn.Module:
    """A new model whose layer m is the mean of teacher layers `groups[m]` (`model` is untouched)."""
    _, _, teacher_layers = find_layer_list(model)
    flat = [i for group in groups for i in group]
    if any(not group for group in groups) or sorted(set(flat)) != flat or any(
        group != list(range(group[0], group[-1] + 1)) for group in groups
    ):
        raise ModelError(f"layer groups {groups} must be non-empty, increasing and contiguous", "e.g. [[0, 1], [2, 3]]")
    student = select_layers(model, [group[0] for group in groups])
    _, _, student_layers = find_layer_list(student)
    for student_layer, group in zip(student_layers, groups):
        states = [teacher_layers[i].state_dict() for i in group]
        merged = {
            name: torch.stack([state[name].float() for state in states]).mean(0).to(tensor.dtype)
            if tensor.is_floating_point() else tensor
            for name, tensor in states[0].items()
        }
        student_layer.load_state_dict(merged)
    student.config.alambic_averaged_layers = [list(group) for group in groups]
    return student
