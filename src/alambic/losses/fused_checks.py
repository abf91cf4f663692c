"""Argument checks of `alambic.losses.fused.fused_distillation_loss` (options, shapes, labels)."""

from __future__ import annotations

import torch

from alambic.errors import ConfigError, DataError, ModelError
from alambic.losses.checks import check_loss_parameters
from alambic.losses.fused_kernels import IGNORE_INDEX


def check_options(objective, temperature, reduction, chunk_size, top_k, alpha, beta, skew_alpha, logit_softcap) -> None:
    check_loss_parameters(
        "fused_distillation_loss", objective=objective, temperature=temperature, alpha=alpha, beta=beta,
        skew_alpha=skew_alpha, top_k=top_k, logit_softcap=logit_softcap,
    )
    if reduction not in ("sum", "mean"):
        raise ConfigError(
            f"fused_distillation_loss: reduction must be 'sum' or 'mean', got {reduction!r}"
        )
    if chunk_size < 1:
        raise ConfigError(f"fused_distillation_loss: chunk_size must be >= 1, got {chunk_size}")


def check_shapes(hidden, weight, bias, labels, mask, teacher_hidden, teacher_weight, teacher_bias, teacher_logits):
    rows, vocab = hidden.shape[0], weight.shape[0]
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ModelError(
            f"student hidden states {tuple(hidden.shape)} do not match the head weight {tuple(weight.shape)}",
            hint="pass hidden states as [tokens, hidden] and the LM head weight as [vocab, hidden]",
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ModelError(f"student head bias has shape {tuple(bias.shape)}, expected ({vocab},)")
    for name, tensor in (("labels", labels), ("mask", mask)):
        if tensor is not None and tuple(tensor.shape) != (rows,):
            raise DataError(f"{name} has shape {tuple(tensor.shape)}, expected ({rows},) like the hidden states")
    if teacher_logits is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ConfigError(
            "fused_distillation_loss: got teacher_logits and a teacher head at once",
            hint="pass either teacher_logits or teacher_hidden with teacher_head_weight",
        )
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ConfigError(
            "fused_distillation_loss: teacher_hidden and teacher_head_weight go together",
            hint="pass both, or teacher_logits instead",
        )
    if teacher_weight is not None:
        fits = teacher_hidden.dim() == 2 and teacher_hidden.shape[0] == rows
        if not fits or teacher_hidden.shape[1] != teacher_weight.shape[1]:
            raise ModelError(
                f"teacher hidden states {tuple(teacher_hidden.shape)} do not fit {rows} tokens and the "
                f"teacher head {tuple(teacher_weight.shape)}"
            )
        if teacher_bias is not None and tuple(teacher_bias.shape) != (teacher_weight.shape[0],):
            raise ModelError(f"teacher head bias has shape {tuple(teacher_bias.shape)}")
    teacher_vocab = teacher_weight.shape[0] if teacher_weight is not None else (
        teacher_logits.shape[-1] if teacher_logits is not None else vocab
    )
    if teacher_logits is not None and tuple(teacher_logits.shape) != (rows, teacher_vocab):
        raise ModelError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, expected ({rows}, vocab)")
    if teacher_vocab != vocab:
        raise ModelError(
            f"student has {vocab} logits per position and the teacher {teacher_vocab}",
            hint="trim both heads to the tokenizer's vocabulary first (StudentModule.head_parameters and LiveTeacher "
            "take vocab_size; see alambic.models.check_tokenizers_compatible), or use the cross_tokenizer mode",
        )


def check_labels(labels: torch.Tensor, vocab: int) -> None:
    wrong = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
    if bool(wrong.any()):
        raise DataError(
            f"labels hold {int(wrong.sum())} ids outside [0, {vocab}) that are not {IGNORE_INDEX}",
            hint=f"use {IGNORE_INDEX} for positions without a label; check that the tokenizer matches the model",
        )
