"""The loss of one micro-batch, as sums over the positions that carry a loss.

The loop divides these sums by the number of loss positions in the whole
optimiser step (all micro-batches, all ranks), so gradient accumulation and DDP
give exactly the gradient of one big batch.

Causal LMs take the fused LM-head path by default (hidden states in, no N x V
logits); the plain path (full logits + the functions in `alambic.losses`) is
kept as the reference and for signals the fused path cannot take (per-row or
per-token weights, a composite multi-teacher signal).

Extra loss terms (representation transfer, early exits, co-distillation peers,
cross-tokenizer, MiniLLM) are called with one `StepOutputs`: the student's and
the teacher's outputs of this micro-batch, so no term runs a model again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alambic.config import LossConfig
from alambic.data import IGNORE
from alambic.losses import per_token_distillation_loss
from alambic.losses.fused import fused_distillation_loss
from alambic.losses.options import LossOptions
from alambic.losses.targets import hard_target_loss, sparse_hard_labels, teacher_hard_labels, without_gold
from alambic.losses.sparse import fused_sparse_distillation_loss, sparse_per_token_distillation_loss
from alambic.models.module import student_module
from alambic.teachers.base import SignalRequest, TeacherSignal, WeightedSignal


@dataclass
class StepOutputs:
    """What one micro-batch's logit loss computed; every extra loss term receives it.

    - student: the student as the loop called it (maybe DDP-wrapped); `module`: the StudentModule behind it.
    - outputs: the student's forward: "logits" (plain path) or "hidden" (fused path), plus the layer
      outputs ("hidden_states", "attentions") that a term asked for in its `needs`.
    - signal: the teacher's signal for the batch (None without a teacher), positions as in the batch.
    """

    student: object
    batch: dict
    outputs: dict
    signal: TeacherSignal | None
    options: LossOptions
    task: str

    @property
    def module(self):
        return student_module(self.student)

    def logits(self) -> torch.Tensor:
        """The student's logits for the whole batch, with gradients, from the forward already run.

        On the fused path only the final hidden states exist: the logits are those
        states through the LM head, which is what the model's forward computes
        (the fused path is only taken for a plain linear head).
        """
        if self.outputs.get("logits") is not None:
            return self.outputs["logits"]
        weight, bias = self.module.head_parameters()
        return self.module.logit_transform().apply(F.linear(self.outputs["hidden"], weight, bias))


def use_fused_path(loss_cfg: LossConfig, student, task: str, batch: dict) -> bool:
    return (
        loss_cfg.fused
        and task == "causal_lm"
        and "weight" not in batch
        and "token_weight" not in batch
        and "has_label" not in batch  # unlabelled rows: the plain path drops their CE (losses/targets.py)
        and target_kind(loss_cfg) == "soft"
        and student.supports_fused_head()
    )


def target_kind(loss_cfg) -> str:
    """soft: the teacher's distribution; hard: its argmax as a label (loss.teacher_targets)."""
    return getattr(loss_cfg, "teacher_targets", "soft")


def per_token_loss(student_logits, signal: TeacherSignal | None, labels, options: LossOptions, mask=None,
                   targets: str = "soft") -> dict:
    """Per-position {"loss", "kd", "ce"} of aligned student logits against any kind of signal.

    Positions outside `mask` are never read (a NaN there cannot reach the sums or gradients).
    targets="hard": the teacher term is the CE against the teacher's argmax (losses/targets.py)."""
    if signal is None:
        return per_token_distillation_loss(student_logits, None, labels, mask=mask, **options.kwargs())
    if signal.components is not None:  # several teachers: the weighted sum of each one's loss
        total: dict = {}
        for part in signal.components:
            if not bool(part.weight.any()):
                continue  # no position of this batch is given to this teacher
            for name, values in per_token_loss(student_logits, part.signal, labels, options, mask, targets).items():
                total[name] = total.get(name, 0.0) + part.weight * values
        return total
    if targets == "hard":
        return hard_target_loss(student_logits, labels, _teacher_argmax(signal), options.alpha)
    if signal.topk_ids is not None:
        options.check_signal_temperature(signal.temperature)
        return sparse_per_token_distillation_loss(
            student_logits, signal.topk_ids, signal.topk_logprobs, signal.tail_logmass, labels,
            kd_mask=signal.extras.get("kd_mask"), mask=mask, **options.kwargs(),
        )
    return per_token_distillation_loss(student_logits, signal.full_logits(), labels, mask=mask, **options.kwargs())


def _teacher_argmax(signal: TeacherSignal) -> torch.Tensor:
    if signal.topk_ids is None:
        return teacher_hard_labels(signal.full_logits())
    ids = sparse_hard_labels(signal.topk_ids, signal.topk_logprobs)
    kd_mask = signal.extras.get("kd_mask")  # positions without a stored teacher distribution learn the label alone
    return ids if kd_mask is None else torch.where(kd_mask.bool(), ids, torch.full_like(ids, IGNORE))


def shift_signal(signal: TeacherSignal) -> TeacherSignal:
    """The signal at positions 0..L-2: the predictions of the next token that carries a label."""
    def cut(value):
        return value[:, :-1] if isinstance(value, torch.Tensor) and value.dim() >= 2 else value

    # extras["kd_mask"] [B, L]: positions that hold a teacher distribution (stored per record; see
    # teachers/record_logprobs.py); the others learn the label alone.
    extras = {"kd_mask": cut(signal.extras["kd_mask"])} if "kd_mask" in signal.extras else {}
    components = None
    if signal.components is not None:
        components = tuple(WeightedSignal(shift_signal(p.signal), cut(p.weight)) for p in signal.components)
    return dataclasses.replace(
        signal, logits=cut(signal.logits), hidden=cut(signal.hidden), topk_ids=cut(signal.topk_ids),
        topk_logprobs=cut(signal.topk_logprobs), tail_logmass=cut(signal.tail_logmass),
        components=components, extras=extras,
    )


def _sums(per_token: dict, mask: torch.Tensor, weight: torch.Tensor | None) -> dict:
    # Selected, never multiplied by 0: a NaN at an uncounted position must not reach the sum.
    scale = 1.0 if weight is None else weight
    return {name: torch.where(mask, values * scale, 0.0).sum() for name, values in per_token.items()}


def causal_lm_loss_sums(student, batch: dict, teacher, loss_cfg: LossConfig, fused: bool, needs=frozenset()):
    """(sums of {loss, kd, ce} over next-token positions with a label, the step's outputs)."""
    options = LossOptions.from_config(loss_cfg)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    signal = teacher(batch, _signal_request(needs, fused)) if teacher is not None else None
    fused = fused and (signal is None or signal.components is None)  # a composite signal needs the logits
    outputs = student(
        batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), hidden_only=fused,
        **_student_layer_outputs(needs),
    )
    step = StepOutputs(student, batch, outputs, signal, options, "causal_lm")
    if fused:
        return _fused_sums(student, outputs["hidden"], signal, labels, mask, loss_cfg, options), step
    weight = batch["weight"][:, None].expand_as(mask) if "weight" in batch else None
    if "token_weight" in batch:  # per-token importance weights set by a rollout (MiniLLM)
        token_weight = batch["token_weight"][:, 1:]
        weight = token_weight if weight is None else weight * token_weight
    shifted = shift_signal(signal) if signal is not None else None
    per_token = per_token_loss(outputs["logits"][:, :-1], shifted, labels, options, mask, target_kind(loss_cfg))
    if signal is not None:  # rows of an unlabelled pool (data.unlabelled) learn the teacher term alone
        per_token = without_gold(per_token, batch.get("has_label"))
    elif "has_label" in batch:
        mask = mask & batch["has_label"][:, None]
    return _sums(per_token, mask, weight), step


def _fused_sums(student, hidden, signal, labels, mask, loss_cfg: LossConfig, options: LossOptions) -> dict:
    student_hidden = hidden[:, :-1][mask]
    flat_labels = labels[mask]
    weight, bias = student_module(student).head_parameters()
    common = {"chunk_size": loss_cfg.chunk_size, "reduction": "sum", **options.kwargs()}
    # The student's own transformation after its head (Gemma soft-capping, Granite / Cohere scaling).
    common["student_transform"] = student_module(student).logit_transform()
    if signal is not None and signal.topk_ids is not None:
        options.check_signal_temperature(signal.temperature)
        shifted = shift_signal(signal)
        kd_mask = shifted.extras.get("kd_mask")
        return fused_sparse_distillation_loss(
            student_hidden, weight, bias, flat_labels, None,
            topk_ids=shifted.topk_ids[mask], topk_logprobs=shifted.topk_logprobs[mask],
            tail_logmass=shifted.tail_logmass[mask], kd_mask=None if kd_mask is None else kd_mask[mask], **common,
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
    return fused_distillation_loss(student_hidden, weight, bias, flat_labels, None, **teacher_kwargs, **common)


def classification_loss_sums(student, batch: dict, teacher, loss_cfg: LossConfig, needs=frozenset()):
    """(sums over examples, the step's outputs): class logits are distilled like token logits."""
    options = LossOptions.from_config(loss_cfg)
    signal = teacher(batch, _signal_request(needs, False)) if teacher is not None else None
    outputs = student(batch["input_ids"], batch["attention_mask"], **_student_layer_outputs(needs))
    per_example = per_token_loss(outputs["logits"], signal, batch["labels"], options, targets=target_kind(loss_cfg))
    step = StepOutputs(student, batch, outputs, signal, options, "sequence_classification")
    has_label = batch["labels"] != IGNORE  # unlabelled rows (a transfer set) learn the teacher term alone
    if signal is None:
        return _sums(per_example, has_label, batch.get("weight")), step
    per_example = without_gold(per_example, has_label)
    return _sums(per_example, torch.ones_like(has_label), batch.get("weight")), step


def loss_positions(batch: dict, task: str) -> int:
    """How many positions of `batch` carry a loss (the normaliser of a step)."""
    if task == "sequence_classification":
        return int(batch["labels"].shape[0])
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sums(student, batch, teacher, loss_cfg: LossConfig, task: str, extra_terms=()) -> dict:
    """Sums of the logit loss plus any extra terms (representation transfer, ...).

    An extra term is a callable term(step: StepOutputs) -> {"loss": sum, name: sum, ...}
    whose "loss" is added to the total; its other entries are logged. A term's
    `needs` (e.g. {"student_hidden_states", "teacher_attentions"}) asks the logit
    loss's own forward passes for those outputs, which the term finds in `step`
    instead of running the models again.
    """
    needs = frozenset().union(*(getattr(term, "needs", ()) for term in extra_terms))
    if task == "sequence_classification":
        sums, step = classification_loss_sums(student, batch, teacher, loss_cfg, needs)
    else:
        fused = use_fused_path(loss_cfg, student_module(student), task, batch)
        sums, step = causal_lm_loss_sums(student, batch, teacher, loss_cfg, fused, needs)
    for term in extra_terms:
        term_sums = dict(term(step))
        sums["loss"] = sums["loss"] + term_sums.pop("loss")
        sums.update(term_sums)
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
