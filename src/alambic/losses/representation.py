"""Feature-based distillation losses, as pure functions (TinyBERT, DistilBERT, relation KD).

Every per-position function returns one value per position ([B, L]) so the
caller can weight by the positions that carry a loss and sum, like the logit
losses in `alambic.losses.divergences`. Everything is computed in fp32.

- hidden_mse / hidden_cosine: a student layer against a teacher layer (after
  the student was projected to the teacher's width, if needed); MSE is the mean
  over the hidden dimension, cosine is 1 - cos.
- attention_mse: TinyBERT's MSE between attention maps; per query position, the
  mean over heads and over the keys the mask keeps. When the head counts differ
  both maps are first averaged over their heads.
- token_relation_mse: token-token cosine-similarity matrices of one sequence,
  compared row by row (width-free: no projection needed).
- sample_relation_mse: sample-sample cosine-similarity matrix of a batch of
  pooled representations, one scalar for the batch.

    python -c "import torch; from alambic.losses.representation import hidden_mse; print(hidden_mse(torch.ones(1, 2, 4), torch.zeros(1, 2, 4)))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the last (hidden) dimension: [..., H] -> [...]."""
    return (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over the hidden dimension: [..., H] -> [...]."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)


def _masked_key_mean(values: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last (key) dimension, counting only keys the mask keeps."""
    if key_mask is None:
        return values.mean(-1)
    keys = key_mask.float()
    while keys.dim() < values.dim():
        keys = keys.unsqueeze(-2)
    return (values * keys).sum(-1) / keys.sum(-1).clamp_min(1.0)


def attention_mse(
    student_attention: torch.Tensor, teacher_attention: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per query position [B, L] from attention maps [B, H, L, L]."""
    student = student_attention.float()
    teacher = teacher_attention.float()
    if student.shape[1] != teacher.shape[1]:
        # Heads cannot be paired one to one: compare the head-averaged maps.
        student = student.mean(1, keepdim=True)
        teacher = teacher.mean(1, keepdim=True)
    per_key = (student - teacher).pow(2).mean(1)  # [B, L_query, L_key]
    return _masked_key_mean(per_key, key_mask)


def similarity_matrix(hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between all pairs of rows: [..., N, H] -> [..., N, N]."""
    unit = F.normalize(hidden.float(), dim=-1, eps=1e-8)
    return unit @ unit.transpose(-1, -2)


def token_relation_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per token [B, L]: mean squared difference of its row of the token-token similarity matrices."""
    difference = similarity_matrix(student_hidden) - similarity_matrix(teacher_hidden)
    return _masked_key_mean(difference.pow(2), key_mask)


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, H] -> [B, H], averaging the positions the mask keeps."""
    if mask is None:
        return hidden.float().mean(1)
    weights = mask.float().unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def sample_relation_mse(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
    """Scalar: mean squared difference of the batch's sample-sample similarity matrices ([B, H_s], [B, H_t])."""
    return (similarity_matrix(student_pooled) - similarity_matrix(teacher_pooled)).pow(2).mean()
