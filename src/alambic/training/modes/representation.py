"""Representation transfer: feature terms added to the logit loss (`representation:`).

- hidden: MSE or cosine between student layer i and teacher layer j for each
  pair of the layer map, through a learned linear projection (student width ->
  teacher width) when the widths differ (FitNets / TinyBERT);
- attention: MSE between the attention maps of mapped layers (TinyBERT);
- relation: token-token (per sequence) or sample-sample (per batch) cosine
  similarity matrices, which need no projection;
- output_cosine: cosine between the final hidden states (DistilBERT).

Layers are numbered from 0 (the first transformer block); layer i means the
output of block i. The projections live in `student.auxiliary`, so the one
optimizer trains them with the student and export (which saves only the
Hugging Face model) drops them. The student and teacher layer outputs come
from the forward passes the logit loss runs anyway (see `needs` below).

    alambic distill configs/representation.yaml
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alambic.data import IGNORE
from alambic.errors import ConfigError
from alambic.losses.representation import (
    attention_mse,
    hidden_cosine,
    hidden_mse,
    masked_mean_pool,
    sample_relation_mse,
    token_relation_mse,
)

AUXILIARY_KEY = "representation"


def resolve_layer_map(spec, student_layers: int, teacher_layers: int, key: str) -> dict[int, int]:
    """{student layer: teacher layer} from a preset or an explicit mapping, checked against the models."""
    if spec == "last":
        return {student_layers - 1: teacher_layers - 1}
    if spec == "uniform":
        # TinyBERT's uniform mapping: student layer i learns from the last teacher layer of the i-th segment.
        return {i: math.ceil((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}
    mapping = {int(i): int(j) for i, j in dict(spec).items()}
    if not mapping:
        raise ConfigError(f"{key} is empty", "map at least one student layer, e.g. {0: 1}, or use 'uniform' / 'last'")
    for student_layer, teacher_layer in mapping.items():
        checks = (("student", student_layer, student_layers), ("teacher", teacher_layer, teacher_layers))
        for role, layer, count in checks:
            if not 0 <= layer < count:
                raise ConfigError(
                    f"{key} maps student layer {student_layer} <- teacher layer {teacher_layer}, "
                    f"but the {role} has no layer {layer} (its layers are 0..{count - 1})",
                    f"use {role} layers 0..{count - 1}, or the presets 'uniform' / 'last'",
                )
    return mapping


def projection_wanted(mode: str, student_width: int, teacher_width: int, key: str) -> bool:
    """'auto': project when the widths differ; 'never': widths must match; 'required': they must differ."""
    if mode == "never" and student_width != teacher_width:
        raise ConfigError(
            f"{key} is 'never' but the student's hidden width ({student_width}) differs from the "
            f"teacher's ({teacher_width}): the states cannot be compared without a projection",
            f"set {key}: auto (a learned linear projection), or use a relation term, which needs none",
        )
    if mode == "required" and student_width == teacher_width:
        raise ConfigError(
            f"{key} is 'required' but the student and the teacher have the same hidden width "
            f"({student_width}): there is nothing to project",
            f"set {key}: auto (projects only when widths differ) or never",
        )
    return student_width != teacher_width


def position_weights(batch: dict, task: str) -> torch.Tensor:
    """[B, L] weights whose sum is the batch's loss-position count (the loop's normaliser).

    Causal LMs: 1 at each position whose next token carries a label, like the logit
    loss. Classifiers: each example's real tokens share a weight of 1.
    """
    mask = batch["attention_mask"].float()
    if task == "sequence_classification":
        return mask / mask.sum(1, keepdim=True).clamp_min(1.0)
    weights = torch.zeros_like(mask)
    weights[:, :-1] = (batch["labels"][:, 1:] != IGNORE).float()
    return weights


def _final_states(outputs: dict, signal) -> tuple[torch.Tensor, torch.Tensor]:
    student = outputs.get("hidden")
    if student is None:
        student = outputs["hidden_states"][-1]
    teacher = signal.hidden if signal.hidden is not None else signal.hidden_states[-1]
    return student, teacher


class RepresentationTerm:
    """The extra loss term: sums over loss positions of every configured feature loss."""

    name = "representation"

    def __init__(self, rep_cfg, task: str, hidden_map: dict, attention_map: dict, relation_map: dict):
        self.cfg = rep_cfg
        self.task = task
        self.hidden_map, self.attention_map, self.relation_map = hidden_map, attention_map, relation_map
        self.needs = set()
        if hidden_map or relation_map or rep_cfg.output_cosine > 0:
            self.needs |= {"student_hidden_states", "teacher_hidden_states"}
        if attention_map:
            self.needs |= {"student_attentions", "teacher_attentions"}

    def __call__(self, step) -> dict:
        batch, outputs, signal = step.batch, step.outputs, step.signal
        projections = step.module.auxiliary[AUXILIARY_KEY]
        weights = position_weights(batch, self.task)
        key_mask = batch["attention_mask"]
        sums = {}
        if self.hidden_map:
            per_position = 0.0
            for i, j in self.hidden_map.items():
                state = outputs["hidden_states"][i + 1]
                if f"hidden_{i}" in projections:
                    state = projections[f"hidden_{i}"](state)
                distance = hidden_mse if self.cfg.hidden.loss == "mse" else hidden_cosine
                per_position = per_position + distance(state, signal.hidden_states[j + 1])
            sums["rep_hidden"] = self.cfg.hidden.weight * (per_position / len(self.hidden_map) * weights).sum()
        if self.attention_map:
            per_position = sum(
                attention_mse(outputs["attentions"][i], signal.attentions[j], key_mask)
                for i, j in self.attention_map.items()
            )
            sums["rep_attention"] = self.cfg.attention.weight * (per_position / len(self.attention_map) * weights).sum()
        if self.relation_map:
            sums["rep_relation"] = self.cfg.relation.weight * self._relation_sum(outputs, signal, weights, key_mask)
        if self.cfg.output_cosine > 0:
            student_final, teacher_final = _final_states(outputs, signal)
            if "output" in projections:
                student_final = projections["output"](student_final)
            per_position = hidden_cosine(student_final, teacher_final)
            sums["rep_output_cosine"] = self.cfg.output_cosine * (per_position * weights).sum()
        return {"loss": sum(sums.values()), **sums}

    def _relation_sum(self, outputs, signal, weights, key_mask) -> torch.Tensor:
        total = 0.0
        for i, j in self.relation_map.items():
            student_state, teacher_state = outputs["hidden_states"][i + 1], signal.hidden_states[j + 1]
            if self.cfg.relation.kind == "token":
                total = total + (token_relation_mse(student_state, teacher_state, key_mask) * weights).sum()
            else:
                # One value per batch: scale it by the batch's loss positions so the loop's division averages it.
                pooled = sample_relation_mse(
                    masked_mean_pool(student_state, key_mask), masked_mean_pool(teacher_state, key_mask)
                )
                total = total + pooled * weights.sum()
        return total / len(self.relation_map)


def _use_eager_attention(model, role: str) -> None:
    """Attention maps are only returned by the eager implementation (sdpa / flash never build them)."""
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        model.config._attn_implementation = "eager"
    if model.config._attn_implementation != "eager":
        raise ConfigError(
            f"representation.attention needs the {role}'s attention maps, but its attention "
            "implementation cannot be switched to 'eager'",
            "remove representation.attention, or use a model that supports eager attention",
        )


def _projections(rep_cfg, hidden_map, student_width: int, teacher_width: int) -> nn.ModuleDict:
    projections = nn.ModuleDict()
    if rep_cfg.hidden is not None and projection_wanted(
        rep_cfg.hidden.projection, student_width, teacher_width, "representation.hidden.projection"
    ):
        for i in hidden_map:
            projections[f"hidden_{i}"] = nn.Linear(student_width, teacher_width, bias=False)
    if rep_cfg.output_cosine > 0 and student_width != teacher_width:
        projections["output"] = nn.Linear(student_width, teacher_width, bias=False)
    return projections


def configure(setup, config) -> None:
    rep_cfg = config.representation
    if rep_cfg is None:
        return
    if rep_cfg.hidden is None and rep_cfg.attention is None and rep_cfg.relation is None and rep_cfg.output_cosine == 0:
        raise ConfigError(
            "the representation section sets no term",
            "add representation.hidden, .attention, .relation or output_cosine > 0, or remove the section",
        )
    student_model, teacher_model = setup.student.model, setup.teacher_model
    student_layers, teacher_layers = student_model.config.num_hidden_layers, teacher_model.config.num_hidden_layers

    def layer_map(section, name):
        if section is None:
            return {}
        return resolve_layer_map(section.layer_map, student_layers, teacher_layers, f"representation.{name}.layer_map")

    hidden_map = layer_map(rep_cfg.hidden, "hidden")
    attention_map = layer_map(rep_cfg.attention, "attention")
    relation_map = layer_map(rep_cfg.relation, "relation")
    widths = student_model.config.hidden_size, teacher_model.config.hidden_size
    setup.student.auxiliary[AUXILIARY_KEY] = _projections(rep_cfg, hidden_map, *widths)
    if attention_map:
        _use_eager_attention(student_model, "student")
        _use_eager_attention(teacher_model, "teacher")
    setup.extra_terms.append(RepresentationTerm(rep_cfg, config.task, hidden_map, attention_map, relation_map))
