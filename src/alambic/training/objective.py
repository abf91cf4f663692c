"""The loss of one micro-batch, as sums over the positions that carry a loss.

The loop divides these sums by the number of loss positions in the whole
optimiser step (all micro-batches, all ranks), so gradient accumulation and DDP
give exactly the gradient of one big batch.

Causal LMs take the fused LM-head path by default (hidden states in, no N x V
logits); the plain path (full logits + the functions in `alambic.losses`) is
kept as the reference and for signals the fused path cannot take.
"""

from __future__ import annotations

import torch

from alambic.config import LossConfig
from alambic.data import IGNORE
from alambic.losses import per_token_distillation_loss
from alambic.teachers.base import SignalRequest, TeacherSignal


def loss_options(loss_cfg: LossConfig) -> dict:
    return {
        "objective": loss_cfg.objective,
        "temperature": loss_cfg.temperature,
        "alpha": loss_cfg.alpha,
        "beta": loss_cfg.beta,
        "skew_alpha": loss_cfg.skew_alpha,
        "top_k": loss_cfg.top_k,
        "logit_softcap": loss_cfg.logit_softcap,
    }


def _fused_available() -> bool:
    try:
        from alambic.losses import fused  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused_path(loss_cfg: LossConfig, student, task: str, batch: dict) -> bool:
    return (
        loss_cfg.fused
        and task == "causal_lm"
        and "weight" not in batch
        and "token_weight" not in batch
        and student.supports_fused_head()
        and _fused_available()
    )


def _sums(per_token: dict, mask: torch.Tensor, weight: torch.Tensor | None) -> dict:
    # Selected, never multiplied by 0: a NaN at an uncounted position must not reach the sum.
    scale = 1.0 if weight is None else weight
    return {name: torch.where(mask, values * scale, 0.0).sum() for name, values in per_token.items()}


def _sparse_per_token(student_logits, signal: TeacherSignal, labels, loss_cfg: LossConfig, mask=None) -> dict:
    from alambic.losses.sparse import sparse_per_token_distillation_loss

    return sparse_per_token_distillation_loss(
        student_logits, signal.topk_ids, signal.topk_logprobs, signal.tail_logmass, labels, mask=mask,
        kd_mask=signal.extras.get("kd_mask"), **{k: v for k, v in loss_options(loss_cfg).items() if k != "top_k"},
    )


def causal_lm_loss_sums(student, batch: dict, teacher, loss_cfg: LossConfig, fused: bool, needs=frozenset()) -> dict:
    """Sums of {loss, kd, ce} over next-token positions with a label."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    signal = teacher(batch, _signal_request(needs, fused)) if teacher is not None else None
    custom_loss = signal.extras.get("per_token_loss") if signal is not None else None
    fused = fused and custom_loss is None  # a source's own per-position loss needs the student's logits
    outputs = student(
        batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), hidden_only=fused,
        **_student_layer_outputs(needs),
    )
    batch["_student_outputs"], batch["_teacher_signal"] = outputs, signal  # reused by extra terms
    if fused:
        return _fused_sums(student, outputs["hidden"], signal, labels, mask, loss_cfg)
    student_logits = outputs["logits"][:, :-1]
    weight = batch["weight"][:, None].expand_as(mask) if "weight" in batch else None
    if "token_weight" in batch:  # per-token importance weights set by a rollout (MiniLLM)
        token_weight = batch["token_weight"][:, 1:]
        weight = token_weight if weight is None else weight * token_weight
    if custom_loss is not None:  # e.g. a multi-teacher weighted sum of divergences
        per_token = custom_loss(student_logits, labels, shift=True)
    elif signal is not None and signal.topk_ids is not None:
        per_token = _sparse_per_token(student_logits, _shift_sparse(signal), labels, loss_cfg, mask)
    else:
        teacher_logits = signal.full_logits()[:, :-1] if signal is not None else None
        per_token = per_token_distillation_loss(
            student_logits, teacher_logits, labels, mask=mask, **loss_options(loss_cfg)
        )
    return _sums(per_token, mask, weight)


def _shift_sparse(signal: TeacherSignal) -> TeacherSignal:
    # extras["kd_mask"] [B, L]: positions that hold a teacher distribution (stored per record; see
    # teachers/record_logprobs.py); the others learn the label alone.
    kd_mask = signal.extras.get("kd_mask")
    return TeacherSignal(
        topk_ids=signal.topk_ids[:, :-1], topk_logprobs=signal.topk_logprobs[:, :-1],
        tail_logmass=signal.tail_logmass[:, :-1], temperature=signal.temperature,
        extras={} if kd_mask is None else {"kd_mask": kd_mask[:, :-1]},
    )


def _fused_sums(student, hidden, signal, labels, mask, loss_cfg: LossConfig) -> dict:
    from alambic.losses.fused import fused_distillation_loss

    student_hidden = hidden[:, :-1][mask]
    flat_labels = labels[mask]
    weight, bias = student_module(student).head_parameters()
    options = loss_options(loss_cfg)
    common = {"chunk_size": loss_cfg.chunk_size, "reduction": "sum"}
    if signal is not None and signal.topk_ids is not None:
        from alambic.losses.sparse import fused_sparse_distillation_loss

        shifted = _shift_sparse(signal)
        options.pop("top_k")
        kd_mask = shifted.extras.get("kd_mask")
        return fused_sparse_distillation_loss(
            student_hidden, weight, bias, flat_labels, None,
            topk_ids=shifted.topk_ids[mask], topk_logprobs=shifted.topk_logprobs[mask],
            tail_logmass=shifted.tail_logmass[mask], kd_mask=None if kd_mask is None else kd_mask[mask],
            student_transform=student_module(student).logit_transform(), **options, **common,
        )
    teacher_kwargs = {}
    if signal is not None and signal.hidden is not None:
        teacher_kwargs = {
            "teacher_hidden": signal.hidden[:, :-1][mask],
            "teacher_head_weight": signal.head_weight,
            "teacher_head_bias": signal.head_bias,
            "teacher_transform": signal.logit_transform,
        }
    elif signal is not None:
        teacher_kwargs = {"teacher_logits": signal.full_logits()[:, :-1][mask]}
    return fused_distillation_loss(
        student_hidden, weight, bias, flat_labels, None, **teacher_kwargs, **options, **common,
        student_transform=student_module(student).logit_transform(),
    )


def classification_loss_sums(student, batch: dict, teacher, loss_cfg: LossConfig, needs=frozenset()) -> dict:
    """Sums over examples: class logits are distilled like token logits."""
    signal = teacher(batch, _signal_request(needs, False)) if teacher is not None else None
    outputs = student(batch["input_ids"], batch["attention_mask"], **_student_layer_outputs(needs))
    batch["_student_outputs"], batch["_teacher_signal"] = outputs, signal  # reused by extra terms
    custom_loss = signal.extras.get("per_token_loss") if signal is not None else None
    if custom_loss is not None:
        per_example = custom_loss(outputs["logits"], batch["labels"], shift=False)
    else:
        teacher_logits = signal.full_logits() if signal is not None else None
        per_example = per_token_distillation_loss(
            outputs["logits"], teacher_logits, batch["labels"], **loss_options(loss_cfg)
        )
    mask = torch.ones_like(batch["labels"], dtype=torch.bool)
    return _sums(per_example, mask, batch.get("weight"))


def loss_positions(batch: dict, task: str) -> int:
    """How many positions of `batch` carry a loss (the normaliser of a step)."""
    if task == "sequence_classification":
        return int(batch["labels"].shape[0])
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sums(student, batch, teacher, loss_cfg: LossConfig, task: str, extra_terms=()) -> dict:
    """Sums of the logit loss plus any extra terms (representation transfer, ...).

    An extra term is a callable (student, batch, teacher) -> {"loss": sum, name: sum, ...}
    whose "loss" is added to the total; its other entries are logged. A term's
    `needs` (e.g. {"student_hidden_states", "teacher_attentions"}) asks the logit
    loss's own forward passes for those outputs; the term finds them in
    batch["_student_outputs"] and batch["_teacher_signal"] instead of running
    the models again.
    """
    needs = frozenset().union(*(getattr(term, "needs", ()) for term in extra_terms))
    if task == "sequence_classification":
        sums = classification_loss_sums(student, batch, teacher, loss_cfg, needs)
    else:
        fused = use_fused_path(loss_cfg, student_module(student), task, batch)
        sums = causal_lm_loss_sums(student, batch, teacher, loss_cfg, fused, needs)
    for term in extra_terms:
        term_sums = term(student, batch, teacher)
        sums["loss"] = sums["loss"] + term_sums.pop("loss")
        sums.update(term_sums)
    # The batch outlives the backward pass until the step ends: do not keep activations alive.
    batch.pop("_student_outputs", None)
    batch.pop("_teacher_signal", None)
    return sums


def _signal_request(needs, fused: bool) -> SignalRequest:
    return SignalRequest(
        hidden_for_fused_head=fused,
        hidden_states="teacher_hidden_states" in needs,
        attentions="teacher_attentions" in needs,
    )


def _student_layer_outputs(needs) -> dict:
    return {
        "output_hidden_states": "student_hidden_states" in needs,
        "output_attentions": "student_attentions" in needs,
    }


def student_module(student):
    """The StudentModule behind a DDP / compiled wrapper."""
    inner = student
    while hasattr(inner, "module"):
        inner = inner.module
    return inner
