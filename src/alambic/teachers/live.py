"""A live teacher: a frozen model run in the loop on every batch."""

from __future__ import annotations

import torch

from alambic.errors import ModelError
from alambic.losses.logit_transform import logit_transform_of, verify_logit_transform
from alambic.teachers.base import SignalRequest, TeacherSignal


class LiveTeacher:
    """Runs a frozen Hugging Face model under no_grad and returns its signal.

    For the fused LM-head loss it returns final hidden states plus the head
    weights instead of logits, so the N x V teacher logits never exist either.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, name: str = "teacher"):
        self.model = model
        self.vocab_size = vocab_size
        self.name = name
        self._transform = None  # (LogitTransform or None when not reproducible), found on first use

    def _head_transform(self):
        """The teacher's own logit transformation after its head, or None if alambic cannot
        reproduce it (then the signal carries full logits instead of hidden states)."""
        if self._transform is None:
            try:
                transform = logit_transform_of(self.model)
                verify_logit_transform(self.model, transform, "teacher")
            except ModelError:
                transform = None
            self._transform = (transform,)
        return self._transform[0]

    def _model_inputs(self, batch: dict) -> dict:
        inputs = {"input_ids": batch["input_ids"]}
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]  # packed rows: block-diagonal mask
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs

    @torch.no_grad()
    def __call__(self, batch: dict, request: SignalRequest) -> TeacherSignal:
        inputs = self._model_inputs(batch)
        want_layers = request.hidden_states or request.attentions
        transform = self._head_transform() if request.hidden_for_fused_head else None
        if transform is not None:
            outputs = self.model.base_model(
                **inputs, use_cache=False, output_hidden_states=request.hidden_states,
                output_attentions=request.attentions,
            )
            head = self.model.get_output_embeddings()
            weight = head.weight if self.vocab_size is None else head.weight[: self.vocab_size]
            bias = getattr(head, "bias", None)
            if bias is not None and self.vocab_size is not None:
                bias = bias[: self.vocab_size]
            return TeacherSignal(
                hidden=outputs.last_hidden_state, head_weight=weight, head_bias=bias, logit_transform=transform,
                hidden_states=outputs.hidden_states if request.hidden_states else None,
                attentions=outputs.attentions if request.attentions else None,
            )
        extra = {"use_cache": False} if "labels" in batch and batch["labels"].dim() == 2 else {}
        outputs = self.model(
            **inputs, output_hidden_states=bool(want_layers and request.hidden_states),
            output_attentions=request.attentions, **extra,
        )
        logits = outputs.logits
        if self.vocab_size is not None and logits.dim() == 3:
            logits = logits[..., : self.vocab_size]
        return TeacherSignal(
            logits=logits,
            hidden_states=outputs.hidden_states if request.hidden_states else None,
            attentions=outputs.attentions if request.attentions else None,
        )
