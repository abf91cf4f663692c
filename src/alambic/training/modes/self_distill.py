"""Self-distillation (`self_distill:`): the student teaches itself.

- teacher "frozen": a frozen copy of the initial student; "ema": an exponential
  moving average of the student, updated after every optimiser step;
  "checkpoint": an earlier model folder or a run's checkpoints/step-N. The copy
  is an ordinary live teacher, so every loss and term of the run applies.
- early exits (deep-to-shallow): a small head on the output of each block in
  `early_exit_layers` learns the final layer's distribution (detached), plus
  hard-label CE with the run's loss.alpha. Causal LMs: a LayerNorm per exit and
  the student's own LM head (shared, as in LayerSkip); classifiers: LayerNorm +
  linear on the mean of the block's token states. The heads live in
  `student.auxiliary` and are not exported.

    alambic distill configs/self_distill.yaml
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from alambic.config import ModelConfig
from alambic.data import IGNORE
from alambic.errors import ConfigError
from alambic.losses import per_token_distillation_loss
from alambic.losses.options import LossOptions
from alambic.losses.representation import masked_mean_pool
from alambic.models import freeze, load_model
from alambic.teachers.ema import FrozenCopy, ema_update
from alambic.teachers.live import LiveTeacher
from alambic.training.modes.base import TeacherChoice

TEACHER_KEY = "self_distill_teacher"
EXITS_KEY = "early_exits"


class EarlyExitHead(nn.Module):
    """LayerNorm + the shared LM head (causal LM), or LayerNorm + its own linear layer (classifier)."""

    def __init__(self, width: int, num_classes: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes) if num_classes else None

    def forward(self, hidden: torch.Tensor, head_weight=None, head_bias=None) -> torch.Tensor:
        normed = self.norm(hidden)
        if self.classifier is not None:
            return self.classifier(normed)
        return F.linear(normed, head_weight, head_bias)


class EarlyExitTerm:
    """Sums over loss positions of each exit's loss against the final layer's (detached) logits."""

    name = "early_exit"
    needs = {"student_hidden_states"}

    def __init__(self, layers: list[int], weight: float, task: str, options: LossOptions):
        self.layers, self.weight, self.task, self.options = layers, weight, task, options

    def __call__(self, step) -> dict:
        module, batch, outputs = step.module, step.batch, step.outputs
        options = self.options.kwargs()
        heads = module.auxiliary[EXITS_KEY]
        total = 0.0
        if self.task == "sequence_classification":
            final = outputs["logits"].detach()
            for layer in self.layers:
                pooled = masked_mean_pool(outputs["hidden_states"][layer + 1], batch["attention_mask"])
                logits = heads[f"layer_{layer}"](pooled)
                total = total + per_token_distillation_loss(logits, final, batch["labels"], **options)["loss"].sum()
        else:
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE
            head_weight, head_bias = module.head_parameters()
            final = _final_logits(outputs, mask, head_weight, head_bias, module.logit_transform())
            for layer in self.layers:
                hidden = outputs["hidden_states"][layer + 1][:, :-1][mask]
                logits = heads[f"layer_{layer}"](hidden, head_weight, head_bias)
                total = total + per_token_distillation_loss(logits, final, labels[mask], **options)["loss"].sum()
        scaled = self.weight * total
        return {"loss": scaled, "early_exit": scaled}


@torch.no_grad()
def _final_logits(outputs: dict, mask: torch.Tensor, head_weight, head_bias, transform) -> torch.Tensor:
    """The final layer's logits at the loss positions; on the fused path they were never built
    (then: the head and the model's own transformation after it, e.g. Gemma soft-capping)."""
    if outputs.get("logits") is not None:
        return outputs["logits"][:, :-1][mask].detach()
    return transform.apply(F.linear(outputs["hidden"][:, :-1][mask], head_weight, head_bias).float())


class EmaHook:
    """after_step hook: the EMA teacher follows the student."""

    def __init__(self, teacher_model: nn.Module, decay: float):
        self.teacher_model, self.decay = teacher_model, decay

    def __call__(self, student_module_, step: int) -> None:
        ema_update(self.teacher_model, student_module_.model, self.decay)


def load_checkpoint_teacher(path: str, setup, task: str) -> nn.Module:
    """A model folder (config.json) or a loop checkpoint (checkpoints/step-N/model.safetensors)."""
    folder = Path(path).expanduser()
    if (folder / "config.json").exists():
        return load_model(ModelConfig(model=str(folder)), task, role="self_distill.checkpoint")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ConfigError(
            f"self_distill.checkpoint {path!r} is neither a model folder (config.json) nor a run checkpoint "
            "(model.safetensors)",
            "point it at a run's final/ folder or at checkpoints/step-N of an earlier run of this student",
        )
    from safetensors.torch import load_model as load_safetensors

    from alambic.models.module import StudentModule

    holder = StudentModule(copy.deepcopy(setup.student.model), setup.vocab_size)
    missing, _ = load_safetensors(holder, str(weights), strict=False)  # auxiliary modules are skipped
    if missing:
        raise ConfigError(
            f"self_distill.checkpoint {path!r} does not fit the student's architecture (missing {missing[:3]})",
            "use a checkpoint of a run with the same student model",
        )
    return holder.model


def _self_teacher(setup, sd_cfg, task: str) -> nn.Module:
    if sd_cfg.teacher == "checkpoint":
        model = freeze(load_checkpoint_teacher(sd_cfg.checkpoint, setup, task)).to(setup.device)
        student_out = setup.student.model.config
        if task == "sequence_classification" and model.config.num_labels != student_out.num_labels:
            raise ConfigError(
                f"self_distill.checkpoint predicts {model.config.num_labels} classes, "
                f"the student {student_out.num_labels}",
                "use a checkpoint of this student",
            )
        return model
    frozen = FrozenCopy(setup.student.model)
    setup.student.auxiliary[TEACHER_KEY] = frozen  # checkpointed, so a resumed run keeps its teacher
    if sd_cfg.teacher == "ema":
        setup.after_step.append(EmaHook(frozen.model, sd_cfg.ema_decay))
    return frozen.model


def _add_early_exits(setup, sd_cfg, config) -> None:
    model = setup.student.model
    layers = model.config.num_hidden_layers
    for layer in sd_cfg.early_exit_layers:
        if layer >= layers - 1:
            raise ConfigError(
                f"self_distill.early_exit_layers names layer {layer}, but the student has layers 0..{layers - 1} "
                f"and layer {layers - 1} already ends in the model's own head",
                f"use layers 0..{layers - 2}" if layers > 1 else "early exits need a student with 2 or more layers",
            )
    classes = model.config.num_labels if config.task == "sequence_classification" else None
    setup.student.auxiliary[EXITS_KEY] = nn.ModuleDict(
        {f"layer_{layer}": EarlyExitHead(model.config.hidden_size, classes) for layer in sd_cfg.early_exit_layers}
    )
    setup.extra_terms.append(
        EarlyExitTerm(list(sd_cfg.early_exit_layers), sd_cfg.early_exit_weight, config.task,
                      LossOptions.from_config(config.loss))
    )


def teacher(setup, config) -> TeacherChoice | None:
    """The student's own teacher (frozen, EMA or checkpoint copy), unless self_distill.teacher is none."""
    sd_cfg = config.self_distill
    if sd_cfg is None or sd_cfg.teacher == "none":
        return None
    teacher_model = _self_teacher(setup, sd_cfg, config.task)
    name = {
        "frozen": "the student's frozen initial copy",
        "ema": f"an EMA of the student (decay {sd_cfg.ema_decay})",
        "checkpoint": f"the student checkpoint {sd_cfg.checkpoint}",
    }[sd_cfg.teacher]
    source = LiveTeacher(teacher_model, setup.vocab_size, name=f"self ({sd_cfg.teacher})")
    return TeacherChoice(source, name, evaluable=True, model=teacher_model)


def configure(setup, config) -> None:
    sd_cfg = config.self_distill
    if sd_cfg is not None and sd_cfg.early_exit_layers:
        _add_early_exits(setup, sd_cfg, config)
