"""The student as its own teacher: a frozen copy, or an exponential moving average (EMA) of it.

The copy is kept in `student.auxiliary` (as a `FrozenCopy`, whose parameters
never require gradients, so the optimizer skips them) so that checkpoints
hold it and a resumed run continues from the same teacher, not from a fresh
copy of the resumed student. Export saves only the student's own model.

After every optimiser step the EMA teacher moves toward the student:
    teacher <- decay * teacher + (1 - decay) * student   (parameters; buffers are copied)
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class FrozenCopy(nn.Module):
    """A gradient-free deep copy of a model that stays in eval mode when its parent trains."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FrozenCopy":
        # The loop calls student.train() on everything inside the student; a teacher never drops out.
        return super().train(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, matched by parameter name."""
    student_parameters = dict(student.named_parameters())
    for name, parameter in teacher.named_parameters():
        parameter.mul_(decay).add_(student_parameters[name].detach().to(parameter.dtype), alpha=1.0 - decay)
    student_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        if name in student_buffers:
            buffer.copy_(student_buffers[name])
