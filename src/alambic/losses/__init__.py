"""Loss functions: logit divergences, hard-label CE, and their masked reductions."""

from alambic.losses.divergences import (
    OBJECTIVES,
    distillation_loss,
    divergence_from_logprobs,
    masked_mean,
    per_token_distillation_loss,
    restrict_to_teacher_top_k,
    token_cross_entropy,
    token_divergence,
)
from alambic.losses.sparse import fused_sparse_distillation_loss, sparse_per_token_distillation_loss, sparse_token_divergence  # noqa: F401
from alambic.losses.fused import fused_distillation_loss  # noqa: F401

__all__ = [
    "OBJECTIVES",
    "distillation_loss",
    "divergence_from_logprobs",
    "masked_mean",
    "per_token_distillation_loss",
    "restrict_to_teacher_top_k",
    "token_cross_entropy",
    "token_divergence",
]
