"""Logit divergences between a student and a teacher, as pure functions.

Every function here takes logits whose last dimension is the vocabulary (or the
classes of a classifier) and returns one value per position, so the caller can
mask and reduce. Everything is computed in fp32 whatever the input dtype: the
log-softmax of bf16 logits loses enough precision to bias gradients.

Conventions (p = teacher distribution, q = student distribution, both at
temperature T):
- forward_kl:  KL(p || q), mean-seeking (Hinton KD).
- reverse_kl:  KL(q || p), mode-seeking (MiniLLM's direction).
- jsd:         generalized JSD of GKD/TRL with m = beta * p + (1 - beta) * q,
               beta * KL(p || m) + (1 - beta) * KL(q || m); beta = 0 is defined
               as forward KL and beta = 1 as reverse KL (the GKD convention).
- skew_forward_kl: KL(p || a p + (1 - a) q) (DistiLLM skew KL, a = skew_alpha).
- skew_reverse_kl: KL(q || (1 - a) p + a q) (DistiLLM skew reverse KL).
- tvd:         0.5 * sum |p - q|.
- cosine:      1 - cos(student_logits, teacher_logits) (DistilBERT's cosine on
               output states; temperature does not change it).
Divergences are multiplied by T**2 so their gradients keep the same scale as
the cross-entropy when T changes (Hinton et al., 2015).

Top-k: when `top_k` is set, both distributions are restricted to the
teacher's k most likely tokens and renormalised there, so every objective stays
a divergence between two proper distributions.

    python -c "import torch; from alambic.losses import token_divergence as d; print(d(torch.randn(4, 10), torch.randn(4, 10), 'jsd'))"
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Objective = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "cosine"
]
from alambic.objective_names import OBJECTIVES  # noqa: E402  (re-exported)


def _kl_from_logprobs(target_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(target || other) over the last dimension; 0 * log 0 counts as 0."""
    target_probs = target_logprobs.exp()
    terms = target_probs * (target_logprobs - other_logprobs)
    return torch.where(target_probs > 0, terms, torch.zeros_like(terms)).sum(-1)


def _log_mixture(
    logprobs_a: torch.Tensor, logprobs_b: torch.Tensor, weight_a: float
) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed stably in log space."""
    stacked = torch.stack(
        [logprobs_a + math.log(weight_a), logprobs_b + math.log(1.0 - weight_a)]
    )
    return torch.logsumexp(stacked, dim=0)


def divergence_from_logprobs(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    objective: str,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """One divergence value per position from normalised log-probabilities."""
    if objective == "forward_kl":
        return _kl_from_logprobs(teacher_logprobs, student_logprobs)
    if objective == "reverse_kl":
        return _kl_from_logprobs(student_logprobs, teacher_logprobs)
    if objective == "jsd":
        if beta <= 0.0:
            return _kl_from_logprobs(teacher_logprobs, student_logprobs)
        if beta >= 1.0:
            return _kl_from_logprobs(student_logprobs, teacher_logprobs)
        mixture = _log_mixture(teacher_logprobs, student_logprobs, beta)
        return beta * _kl_from_logprobs(teacher_logprobs, mixture) + (1.0 - beta) * _kl_from_logprobs(
            student_logprobs, mixture
        )
    if objective in ("skew_forward_kl", "skew_reverse_kl"):
        # a = 0 gives the plain KL of that direction; a = 1 compares a distribution with itself.
        if skew_alpha >= 1.0:
            return student_logprobs.new_zeros(student_logprobs.shape[:-1])
        if objective == "skew_forward_kl":
            mixture = (
                student_logprobs
                if skew_alpha <= 0.0
                else _log_mixture(teacher_logprobs, student_logprobs, skew_alpha)
            )
            return _kl_from_logprobs(teacher_logprobs, mixture)
        mixture = (
            teacher_logprobs
            if skew_alpha <= 0.0
            else _log_mixture(student_logprobs, teacher_logprobs, skew_alpha)
        )
        return _kl_from_logprobs(student_logprobs, mixture)
    if objective == "tvd":
        return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def restrict_to_teacher_top_k(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather both logit tensors on the teacher's top-k support (last dimension)."""
    top_k = min(top_k, teacher_logits.shape[-1])
    teacher_top, top_ids = teacher_logits.topk(top_k, dim=-1)
    return student_logits.gather(-1, top_ids), teacher_top


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-position divergence (shape = logits.shape[:-1]), scaled by T**2."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.float()
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student has {student_logits.shape[-1]} logits per position and the teacher "
            f"{teacher_logits.shape[-1]}: trim both to the tokenizer's vocabulary first (StudentModule and "
            "LiveTeacher take vocab_size; see alambic.models.check_tokenizers_compatible), or, for two "
            "different tokenizers, use the cross_tokenizer mode"
        )
    if top_k is not None:
        student_logits, teacher_logits = restrict_to_teacher_top_k(
            student_logits, teacher_logits, top_k
        )
    if objective == "cosine":
        return 1.0 - F.cosine_similarity(student_logits, teacher_logits, dim=-1)
    student_logprobs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits / temperature, dim=-1)
    values = divergence_from_logprobs(student_logprobs, teacher_logprobs, objective, beta, skew_alpha)
    return values * temperature**2


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-position hard-label cross-entropy in fp32; ignored labels give 0."""
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return flat.reshape(labels.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions where mask is true; 0 when nothing is selected."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def per_token_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Per-position {"loss", "kd", "ce"}: loss = alpha * CE + (1 - alpha) * T**2 * D.

    Without a teacher the loss is the plain CE (supervised training through the
    same loop). The caller masks and reduces; the loop sums over the tokens of a
    whole optimiser step so gradient accumulation and DDP do not change the result.
    """
    shape = student_logits.shape[:-1]
    zeros = student_logits.new_zeros(shape, dtype=torch.float32)
    kd = zeros
    ce = zeros
    if teacher_logits is not None and alpha < 1.0:
        kd = token_divergence(
            student_logits, teacher_logits, objective, temperature, beta, skew_alpha, top_k
        )
    if labels is not None and (alpha > 0.0 or teacher_logits is None):
        ce = token_cross_entropy(student_logits, labels, ignore_index)
    if teacher_logits is None:
        return {"loss": ce, "kd": kd, "ce": ce}
    return {"loss": alpha * ce + (1.0 - alpha) * kd, "kd": kd, "ce": ce}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Masked means of `per_token_distillation_loss` ({"loss", "kd", "ce"}).

    `mask` selects the positions that count (padding and prompt tokens never
    do); when it is None and labels are given, positions whose label is the
    ignore index (-100) are excluded.
    """
    ignore_index = options.get("ignore_index", -100)
    if mask is None and labels is not None:
        mask = labels != ignore_index
    per_token = per_token_distillation_loss(student_logits, teacher_logits, labels, **options)
    return {name: masked_mean(values, mask) for name, values in per_token.items()}
