"""Target kinds and rows without a gold label (transfer sets).

Three kinds of target can teach a student:

- gold labels (the data's own label, or the text's next token): the hard-label CE term;
- the teacher's soft targets (its whole distribution at temperature T): the KD term
  (`loss.teacher_targets: soft`, model distillation);
- the teacher's hard labels (the argmax of its distribution): the KD term becomes the
  CE against the teacher's argmax (`loss.teacher_targets: hard`, data distillation).

Where a row has a gold label the loss is alpha * CE + (1 - alpha) * teacher term, as
always. Where it has none (an unlabelled transfer-set row), the loss of that row is the
teacher term alone, at full weight: alpha only decides how gold and teacher share a row
that has both.

    python -c "import torch; from alambic.losses.targets import teacher_hard_labels as h; print(h(torch.tensor([[0.1, 2.0, -1.0]])))"
"""

from __future__ import annotations

import torch

from alambic.losses.divergences import token_cross_entropy

TARGET_KINDS = ("soft", "hard")


def teacher_hard_labels(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's argmax class / token at every position (ties: the lowest index)."""
    return teacher_logits.argmax(dim=-1)


def sparse_hard_labels(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """The argmax of a sparse top-k teacher distribution: the id whose log-probability is highest."""
    best = topk_logprobs.argmax(dim=-1, keepdim=True)
    return topk_ids.gather(-1, best).squeeze(-1).long()


def hard_target_loss(student_logits: torch.Tensor, labels: torch.Tensor | None, teacher_labels: torch.Tensor,
                     alpha: float, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Per position {"loss", "kd", "ce"} with the teacher's argmax as the teacher term (no temperature)."""
    kd = token_cross_entropy(student_logits, teacher_labels, ignore_index)
    if labels is None or alpha <= 0.0:
        ce = torch.zeros_like(kd)
    else:
        ce = token_cross_entropy(student_logits, labels, ignore_index)
    return {"loss": alpha * ce + (1.0 - alpha) * kd, "kd": kd, "ce": ce}


def without_gold(per_position: dict[str, torch.Tensor], has_label: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Rows without a gold label learn the teacher term alone (at full weight); their CE is 0.

    `has_label` is [B] (one flag per row) or the shape of the per-position values.
    """
    if has_label is None:
        return per_position
    kd = per_position["kd"]
    flags = has_label
    while flags.dim() < kd.dim():
        flags = flags.unsqueeze(-1)
    flags = flags.expand_as(kd)
    zeros = torch.zeros_like(kd)
    result = dict(per_position)
    result["loss"] = torch.where(flags, per_position["loss"], kd)
    result["ce"] = torch.where(flags, per_position["ce"], zeros)
    return result
