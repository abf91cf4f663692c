"""Several teachers as one signal source: fixed weights, per-position confidence, or routing.

Each member is itself a source (a live model or a logit cache). Its signal is
turned into log-probabilities at the loss temperature T, and the members are
weighted per position:

- fixed: the configured weights, normalised to sum to 1;
- confidence: weight_k x exp(-entropy_k), renormalised, per position (per
  example for classifiers): a teacher that is sure of itself counts more;
- route: each row's teacher is named by a data column (weight 1 for it, 0 else).

With mix "distribution" the loss sees one target, the mixture sum_k w_k p_k,
handed over as logits T * log(mixture) so that the loss's softmax(. / T)
gives back exactly the mixture. With mix "divergences" the signal is
composite (`TeacherSignal.components`: each member's signal with its weights)
and the loss computes sum_k w_k * loss(student, teacher_k): the CE part is the
same for every member and the weights sum to 1, so the total is
alpha * CE + (1 - alpha) * sum_k w_k * divergence_k.

A cached (top-k) member enters the mixture with its tail mass spread evenly
over the tokens outside its top-k; in the divergences mix it keeps the exact
sparse loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alambic.errors import DataError
from alambic.teachers.base import SignalRequest, TeacherSignal, WeightedSignal


@dataclass
class Member:
    name: str
    source: object  # a TeacherSource
    weight: float


def dense_logprobs_from_topk(topk_ids, topk_logprobs, tail_logmass, vocab_size: int) -> torch.Tensor:
    """[..., k] sparse log-probabilities -> [..., V], the tail mass shared evenly by the other tokens."""
    others = vocab_size - topk_ids.shape[-1]
    fill = tail_logmass.float() - math.log(others) if others > 0 else torch.full_like(tail_logmass.float(), -math.inf)
    dense = fill.unsqueeze(-1).expand(*topk_ids.shape[:-1], vocab_size).clone()
    return dense.scatter_(-1, topk_ids.long(), topk_logprobs.float())


def member_logprobs(signal: TeacherSignal, temperature: float, vocab_size: int | None) -> torch.Tensor:
    """A member's distribution at the loss temperature, as log-probabilities."""
    if signal.topk_ids is not None:
        if vocab_size is None:
            raise DataError("a cached (top-k) teacher in an ensemble needs the vocabulary size")
        return dense_logprobs_from_topk(signal.topk_ids, signal.topk_logprobs, signal.tail_logmass, vocab_size)
    return torch.log_softmax(signal.full_logits().float() / temperature, dim=-1)


def confidence_weights(logprobs: torch.Tensor, base_weights: torch.Tensor) -> torch.Tensor:
    """[K, ..., V] log-probs, [K] weights -> [K, ...] weights proportional to weight_k * exp(-entropy_k)."""
    probs = logprobs.exp()
    entropy = -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1)
    shape = (-1,) + (1,) * (entropy.dim() - 1)
    return torch.softmax(base_weights.log().view(shape) - entropy, dim=0)


def mixture_logits(logprobs: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """T * log(sum_k w_k p_k): logits whose softmax at temperature T is the mixture."""
    return temperature * torch.logsumexp(weights.log().unsqueeze(-1) + logprobs, dim=0)


class RouteTable:
    """Which member teaches each row, looked up by the row's exact token ids.

    Keyed by content rather than by dataset index, so it holds for train and
    eval rows alike and does not depend on splits or on rows dropped by filters.
    """

    def __init__(self, routes: dict[tuple[int, ...], int], column: str):
        self.routes = routes
        self.column = column

    def members_of(self, batch: dict) -> list[int]:
        lengths = batch["attention_mask"].sum(1).tolist()
        members = []
        for ids, length in zip(batch["input_ids"].tolist(), lengths):
            member = self.routes.get(tuple(ids[: int(length)]))
            if member is None:
                raise DataError(
                    f"a batch row is not one of the data records whose {self.column!r} column names its teacher",
                    "routing needs rows exactly as in the data files: turn off data.packing and on-policy rollouts",
                )
            members.append(member)
        return members


class EnsembleTeacher:
    """A `TeacherSource` combining the signals of `members`."""

    def __init__(self, members: list[Member], method: str, mix: str, temperature: float, vocab_size: int | None,
                 routes: RouteTable | None = None):
        self.members = members
        self.method, self.mix = method, mix
        self.temperature = temperature  # the loss temperature: members are mixed as distributions at T
        self.vocab_size = vocab_size
        self.routes = routes
        self.name = f"ensemble of {', '.join(m.name for m in members)} ({method} weights, {mix} mix)"

    def bind(self, train_data, config=None) -> None:
        for member in self.members:
            bind = getattr(member.source, "bind", None)
            if bind is not None:
                bind(train_data, config)

    def member_weights(self, batch: dict, logprobs: torch.Tensor) -> torch.Tensor:
        """[K, B, L] (causal LM) or [K, B] (classifier) weights that sum to 1 over K."""
        positions = logprobs.shape[1:-1]
        base = torch.tensor([m.weight for m in self.members], dtype=torch.float32, device=logprobs.device)
        if self.method == "confidence":
            return confidence_weights(logprobs, base)
        if self.method == "route":
            chosen = torch.tensor(self.routes.members_of(batch), device=logprobs.device)
            onehot = torch.nn.functional.one_hot(chosen, len(self.members)).T.float()  # [K, B]
            return onehot.view(*onehot.shape, *([1] * (len(positions) - 1))).expand(-1, *positions)
        base = base / base.sum()
        return base.view(-1, *([1] * len(positions))).expand(-1, *positions)

    @torch.no_grad()
    def __call__(self, batch: dict, request: SignalRequest | None = None) -> TeacherSignal:
        signals = [member.source(batch, SignalRequest()) for member in self.members]
        logprobs = torch.stack([member_logprobs(s, self.temperature, self.vocab_size) for s in signals])
        weights = self.member_weights(batch, logprobs)
        signal = TeacherSignal(logits=mixture_logits(logprobs, weights, self.temperature))
        signal.extras["member_weights"] = weights
        if self.mix == "divergences":
            signal.components = tuple(WeightedSignal(one, weight) for one, weight in zip(signals, weights))
        return signal
