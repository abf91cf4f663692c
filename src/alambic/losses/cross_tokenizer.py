"""Divergences between a student and a teacher whose vocabularies differ.

Both functions take logits at positions already aligned through the text (see
`alambic.models.alignment`) and return one value per position:

- `uld_distance`: Universal Logit Distillation (Boizard et al., 2024). Each
  distribution's probabilities are sorted in decreasing order, the shorter
  vocabulary is padded with zeros, and the distance is the sum of absolute
  differences (the Wasserstein-1 distance between the two sorted
  distributions under the paper's uniform-cost simplification). It needs no
  token correspondence at all, so it is zero for any relabelling of the
  vocabulary: it matches the *shape* of the distribution, not which token gets
  which probability.
- `projected_teacher_kl`: the token-alignment method. The teacher's
  probabilities are summed onto student tokens through a teacher -> student
  token map, renormalised over the mapped mass, and compared with
  KL(teacher || student).

Values are multiplied by T**2 like the other divergences so changing the
temperature keeps the gradient scale of the CE term.

    python -c "import torch; from alambic.losses.cross_tokenizer import uld_distance as d; x = torch.randn(3, 7); print(d(x, x[:, torch.randperm(7)]))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum |sorted p_student - sorted p_teacher| per position; shapes [..., V_s] and [..., V_t]."""
    student_probs = F.softmax(student_logits.float() / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    teacher_sorted = F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1) * temperature**2


def project_teacher_probs(teacher_probs: torch.Tensor, vocab_map: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """[N, V_t] teacher probabilities summed onto [N, V_s] through `vocab_map` (-1 = dropped), renormalised."""
    mapped = vocab_map >= 0
    teacher_ids = mapped.nonzero().squeeze(-1)
    projected = teacher_probs.new_zeros(teacher_probs.shape[0], student_vocab)
    projected.index_add_(1, vocab_map[teacher_ids], teacher_probs[:, teacher_ids])
    # Mass on unmapped teacher tokens (specials without a counterpart) is dropped, not invented.
    return projected / projected.sum(-1, keepdim=True).clamp_min(1e-12)


def projected_teacher_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_map: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher projected onto the student vocabulary || student) per position; [N, V_s], [N, V_t]."""
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    target = project_teacher_probs(teacher_probs, vocab_map.to(teacher_probs.device), student_logits.shape[-1])
    terms = target * (target.clamp_min(1e-30).log() - student_logprobs)
    kl = torch.where(target > 0, terms, torch.zeros_like(terms)).sum(-1)
    return kl * temperature**2

