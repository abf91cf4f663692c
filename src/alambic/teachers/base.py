"""What a teacher hands the training loop, and the interface every source follows.

The loop never asks *where* the signal comes from (a live model, an offline
top-k cache, an ensemble, an API): it calls `source(batch)` and gets a
`TeacherSignal`. Sources fill what they can; the loss uses what is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from alambic.losses.logit_transform import LogitTransform


@dataclass
class TeacherSignal:
    """Teacher outputs for one batch. Positions follow the batch's input_ids.

    - logits: full logits [B, L, V] (causal LM) or [B, C] (classifier).
    - hidden / head_weight / head_bias: final hidden states [B, L, H_t] and the
      LM head, so the fused loss can compute teacher logits chunk by chunk;
      logit_transform: what the teacher's forward() applies after that head.
    - topk_ids / topk_logprobs: [B, L, k] sparse teacher distribution (offline
      cache), log-probabilities at `temperature`; tail_logmass: log(1 - sum p_topk).
    - hidden_states / attentions: per-layer tensors for representation transfer.
    - components: a teacher that is several teachers (multi-teacher "divergences"
      mix): the loss is sum_k weight_k * loss(student, signal_k), the weights
      [B, L] (or [B]) summing to 1 over k; `logits` then holds their mixture,
      for held-out metrics.
    - temperature: the temperature a stored signal (top-k log-probabilities)
      was computed at; the loss refuses it at any other temperature.
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    logit_transform: LogitTransform | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    temperature: float | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    components: tuple["WeightedSignal", ...] | None = None
    extras: dict = field(default_factory=dict)

    def full_logits(self) -> torch.Tensor:
        """Dense teacher logits, computing them from hidden states if needed."""
        if self.logits is not None:
            return self.logits
        if self.hidden is not None and self.head_weight is not None:
            logits = self.hidden.float() @ self.head_weight.float().T
            logits = logits + self.head_bias.float() if self.head_bias is not None else logits
            return logits if self.logit_transform is None else self.logit_transform.apply(logits)
        raise ValueError("this teacher signal holds no dense logits (it is a sparse top-k signal)")


@dataclass
class WeightedSignal:
    """One part of a composite signal: a teacher's signal and its per-position weight."""

    signal: TeacherSignal
    weight: torch.Tensor


@dataclass
class SignalRequest:
    """What the loss needs from the teacher for this step."""

    hidden_for_fused_head: bool = False
    hidden_states: bool = False
    attentions: bool = False


class TeacherSource(Protocol):
    """A callable that turns a collated batch into a `TeacherSignal`."""

    name: str

    def __call__(self, batch: dict, request: SignalRequest) -> TeacherSignal: ...
