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

Columns that are not tokens of the teacher: a teacher logit of -inf (padded
vocabulary rows of its head, banned tokens, a densified top-k cache) removes
that column from BOTH distributions, and the student is renormalised over the
remaining ones, for every objective (cosine: both vectors lose the column). So
reverse KL and JSD(beta=1) stay finite instead of inf/NaN. A position where the
teacher has no finite logit at all has divergence 0 and no gradient.

Masks: `per_token_distillation_loss(..., mask=m)` never reads the logits of a
position outside m (they are replaced by zeros before any arithmetic), so a NaN
or inf there cannot reach the value or the gradient; `masked_mean` selects,
never multiplies.

Optional `logit_softcap` c caps both logit tensors, c * tanh(z / c) (Gemma 2's
stabiliser), before the temperature, for the divergence and the CE alike.
Parameters are range-checked (alambic.losses.checks) before any tensor work.

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
from alambic.losses.checks import check_loss_parameters  # noqa: E402

# Log-probability given to an excluded column in both distributions: exp() is exactly 0
# in fp32 and fp64, and the logs stay finite, so its terms and their gradients are 0.
EXCLUDED_LOGPROB = -1.0e4


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
    check_loss_parameters("divergence_from_logprobs", objective=objective, beta=beta, skew_alpha=skew_alpha)
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
    if objective == "skew_forward_kl":
        return _kl_from_logprobs(teacher_logprobs, _log_mixture(teacher_logprobs, student_logprobs, skew_alpha))
    if objective == "skew_reverse_kl":
        return _kl_from_logprobs(student_logprobs, _log_mixture(student_logprobs, teacher_logprobs, skew_alpha))
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


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2's final logit soft-capping); identity for None.

    -inf stays -inf: it marks a column that is not a token (see token_divergence).
    """
    if cap is None:
        return logits
    return torch.where(torch.isneginf(logits), logits, torch.tanh(logits / cap) * cap)


def excluded_columns(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(student, teacher, excluded, dead): columns where the teacher logit is -inf, and
    positions where every column is (dead; None when there are none).

    Dead positions get zero logits on both sides (their value is zeroed by the caller);
    the caller removes the excluded columns from the student's softmax too (the plain
    path with -inf, the fused kernel with the dtype's lowest value).
    """
    excluded = torch.isneginf(teacher_logits)
    if not bool(excluded.any()):
        return student_logits, teacher_logits, None, None
    dead = excluded.all(-1, keepdim=True)
    if not bool(dead.any()):
        return student_logits, teacher_logits, excluded, None
    excluded = excluded & ~dead
    return torch.where(dead, 0.0, student_logits), torch.where(dead, 0.0, teacher_logits), excluded, dead


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Per-position divergence (shape = logits.shape[:-1]), scaled by T**2."""
    check_loss_parameters(
        "token_divergence", objective=objective, temperature=temperature, beta=beta,
        skew_alpha=skew_alpha, top_k=top_k, logit_softcap=logit_softcap,
    )
    student_logits = softcap(student_logits.float(), logit_softcap)
    teacher_logits = softcap(teacher_logits.float(), logit_softcap)
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
    student_logits, teacher_logits, excluded, dead = excluded_columns(student_logits, teacher_logits)
    if excluded is not None:
        student_logits = student_logits.masked_fill(excluded, float("-inf"))
    if objective == "cosine":
        if excluded is not None:
            student_logits = student_logits.masked_fill(excluded, 0.0)
            teacher_logits = teacher_logits.masked_fill(excluded, 0.0)
        values = 1.0 - F.cosine_similarity(student_logits, teacher_logits, dim=-1)
    else:
        student_logprobs = F.log_softmax(student_logits / temperature, dim=-1)
        teacher_logprobs = F.log_softmax(teacher_logits / temperature, dim=-1)
        if excluded is not None:
            student_logprobs = student_logprobs.masked_fill(excluded, EXCLUDED_LOGPROB)
            teacher_logprobs = teacher_logprobs.masked_fill(excluded, EXCLUDED_LOGPROB)
        values = divergence_from_logprobs(student_logprobs, teacher_logprobs, objective, beta, skew_alpha)
        values = values * temperature**2
    if dead is not None:
        values = torch.where(dead.squeeze(-1), 0.0, values)
    return values


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
    """Mean over positions where mask is true; 0 when nothing is selected.

    Positions outside the mask are selected away (torch.where), never multiplied
    by 0, so a NaN or inf there does not reach the result.
    """
    if mask is None:
        return values.mean()
    mask = mask.to(torch.bool)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1).to(values.dtype)


def _outside_mask_zeroed(tensor: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor` with every position outside `mask` set to 0 (no gradient flows there)."""
    if tensor is None or mask is None:
        return tensor
    return torch.where(mask.to(torch.bool)[..., None], tensor, 0.0)


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
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position {"loss", "kd", "ce"}: loss = alpha * CE + (1 - alpha) * T**2 * D.

    Without a teacher the loss is the plain CE (supervised training through the
    same loop). The caller masks and reduces; the loop sums over the tokens of a
    whole optimiser step so gradient accumulation and DDP do not change the result.
    With `mask` (shape of the positions), positions outside it are 0 in every
    output and their logits are never read (NaN there cannot leak into gradients).
    """
    check_loss_parameters(
        "per_token_distillation_loss", objective=objective, temperature=temperature, alpha=alpha,
        beta=beta, skew_alpha=skew_alpha, top_k=top_k, logit_softcap=logit_softcap,
    )
    if mask is not None and bool(mask.all()):
        mask = None
    student_logits = _outside_mask_zeroed(student_logits, mask)
    teacher_logits = _outside_mask_zeroed(teacher_logits, mask)
    shape = student_logits.shape[:-1]
    zeros = student_logits.new_zeros(shape, dtype=torch.float32)
    kd = zeros
    ce = zeros
    if teacher_logits is not None and alpha < 1.0:
        kd = token_divergence(
            student_logits, teacher_logits, objective, temperature, beta, skew_alpha, top_k, logit_softcap
        )
    if labels is not None and (alpha > 0.0 or teacher_logits is None):
        ce = token_cross_entropy(softcap(student_logits, logit_softcap), labels, ignore_index)
    if teacher_logits is None:
        out = {"loss": ce, "kd": kd, "ce": ce}
    else:
        out = {"loss": alpha * ce + (1.0 - alpha) * kd, "kd": kd, "ce": ce}
    if mask is not None:
        keep = mask.to(torch.bool)
        out = {name: torch.where(keep, values, 0.0) for name, values in out.items()}
    return out


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
    ignore index (-100) are excluded. Nothing at an uncounted position reaches
    the result or its gradient.
    """
    ignore_index = options.get("ignore_index", -100)
    if mask is None and labels is not None:
        mask = labels != ignore_index
    per_token = per_token_distillation_loss(student_logits, teacher_logits, labels, mask=mask, **options)
    return {name: masked_mean(values, mask) for name, values in per_token.items()}
