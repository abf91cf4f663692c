"""Interchange-intervention (causal) distillation (`interchange:`), Wu et al. 2022.

Each micro-batch, every base row gets a source row of the same batch (`pairing`) and
some token positions (`positions`). At an aligned pair of blocks (`layer_map`, one
pair per batch, drawn in turn) the block's outputs at those positions are replaced
by the source row's, in the teacher and in the student; the student's counterfactual
next-token distribution is then trained toward the teacher's with the run's
objective and temperature, on the positions the swap can affect (at or after the
first swapped one). The term is added to the usual KD loss with `weight`.

Source activations come from the forward passes the logit loss runs anyway
(`needs`), so each step costs one extra intervened forward per model. The swap is a
forward hook (models/interventions.py says why not pyvene); the loss is the fused
LM-head loss on the counterfactual hidden states, so no N x V logits are materialised.

    alambic distill configs/interchange.yaml
"""

from __future__ import annotations

import torch

from alambic.errors import ConfigError
from alambic.models.interventions import (
    LayerSwap,
    affected_positions,
    choose_positions,
    choose_sources,
    gather_positions,
    model_inputs,
)


class InterchangeTerm:
    """The extra loss term: weight x divergence(teacher_cf || student_cf) summed over affected positions."""

    name = "interchange"
    needs = {"student_hidden_states", "teacher_hidden_states"}

    def __init__(self, cfg, chunk_size: int, seed: int, student_swaps: dict, teacher_swaps: dict, teacher_model, vocab):
        self.cfg, self.chunk_size, self.seed = cfg, chunk_size, seed
        self.pairs = sorted(cfg.layer_map.items())
        self.student_swaps, self.teacher_swaps = student_swaps, teacher_swaps
        self.teacher_model, self.vocab = teacher_model, vocab

    def _generator(self, batch: dict) -> torch.Generator:
        """Seeded by the batch's rows, so a resumed run draws the same swaps."""
        rows = batch.get("row_index")
        key = 0 if rows is None else int((rows.cpu() * torch.arange(1, len(rows) + 1)).sum())
        return torch.Generator().manual_seed((self.seed * 1_000_003 + key) % (2**31))

    def plan(self, batch: dict, generator: torch.Generator):
        """(student layer, teacher layer, source rows [B], positions [B, k] or None)."""
        pair = self.pairs[int(torch.randint(len(self.pairs), (1,), generator=generator))]
        mask = batch["attention_mask"].bool().cpu()
        sources = choose_sources(mask.shape[0], self.cfg.pairing, generator)
        positions = choose_positions(mask & mask[sources], self.cfg.positions, self.cfg.num_positions, generator)
        return pair[0], pair[1], sources, positions

    def __call__(self, step) -> dict:
        batch, outputs, signal = step.batch, step.outputs, step.signal
        student_layer, teacher_layer, sources, positions = self.plan(batch, self._generator(batch))
        if positions is None:
            zero = outputs["hidden_states"][0].sum() * 0.0
            return {"loss": zero, "interchange": zero.detach()}
        device = batch["input_ids"].device
        sources, positions = sources.to(device), positions.to(device)
        inputs = model_inputs(batch)
        student_source = gather_positions(outputs["hidden_states"][student_layer + 1][sources], positions)
        student_cf = self.student_swaps[student_layer](inputs, positions, student_source)
        with torch.no_grad():
            teacher_source = gather_positions(signal.hidden_states[teacher_layer + 1][sources], positions)
            teacher_cf = self.teacher_swaps[teacher_layer](inputs, positions, teacher_source)
        value = self.divergence(step, student_cf, teacher_cf, positions)
        return {"loss": self.cfg.weight * value, "interchange": value.detach()}

    def divergence(self, step, student_cf, teacher_cf, positions) -> torch.Tensor:
        """The run's divergence (its objective and temperature, no CE) of the counterfactual distributions."""
        from alambic.losses.fused import fused_distillation_loss

        labels = step.batch["labels"]
        mask = affected_positions(labels, positions)
        weight, bias = step.module.head_parameters()
        teacher_head = self.teacher_model.get_output_embeddings()
        options = step.options.replace(alpha=0.0).kwargs()
        result = fused_distillation_loss(
            student_cf[:, :-1][mask], weight, bias, labels[:, 1:][mask], None,
            teacher_hidden=teacher_cf[:, :-1][mask], teacher_head_weight=teacher_head.weight[: self.vocab],
            teacher_head_bias=None if teacher_head.bias is None else teacher_head.bias[: self.vocab],
            chunk_size=self.chunk_size, reduction="sum", **options,
        )
        return result["loss"]


def _check_heads(setup) -> None:
    """Which teacher and task are checked by alambic.compat; here what only the loaded models show."""
    for role, model in (("student", setup.student.model), ("teacher", setup.teacher_model)):
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or getattr(model.config, "final_logit_softcapping", None):
            raise ConfigError(f"interchange distillation needs the {role}'s logits to be a plain linear head of its "
                              "hidden states", "use a model without logit soft-capping")


def _check_layers(layer_map: dict, student_layers: int, teacher_layers: int) -> None:
    for student_layer, teacher_layer in layer_map.items():
        for role, layer, count in (("student", student_layer, student_layers), ("teacher", teacher_layer, teacher_layers)):
            if not 0 <= layer < count - 1:
                raise ConfigError(
                    f"interchange.layer_map maps student layer {student_layer} <- teacher layer {teacher_layer}, but "
                    f"the {role} has blocks 0..{count - 1} and the last one cannot be intervened on "
                    "(its output is the model's final state)",
                    f"use {role} layers 0..{count - 2}",
                )


def configure(setup, config) -> None:
    cfg = getattr(config, "interchange", None)
    if cfg is None:
        return
    _check_heads(setup)
    student_model, teacher_model = setup.student.model, setup.teacher_model
    _check_layers(cfg.layer_map, student_model.config.num_hidden_layers, teacher_model.config.num_hidden_layers)
    student_swaps = {i: LayerSwap(student_model.base_model, i) for i in set(cfg.layer_map)}
    teacher_swaps = {j: LayerSwap(teacher_model.base_model, j) for j in set(cfg.layer_map.values())}
    vocab = setup.vocab_size or teacher_model.get_output_embeddings().weight.shape[0]
    setup.extra_terms.append(
        InterchangeTerm(cfg, config.loss.chunk_size, config.train.seed, student_swaps, teacher_swaps, teacher_model, vocab)
    )
