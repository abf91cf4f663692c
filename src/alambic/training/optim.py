"""AdamW and a learning-rate schedule with linear warmup."""

from __future__ import annotations

import math

import torch

from alambic.config import TrainConfig


def build_optimizer(module: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norms: decaying them only hurts small models.
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas))


class WarmupSchedule:
    """Multiplier of the base lr at a step; a class so its state is picklable."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig):
    schedule = WarmupSchedule(train_cfg.scheduler, train_cfg.warmup_steps, train_cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
