"""The trainable unit: the student model plus anything that trains beside it.

Wrapping the Hugging Face model lets the loop (and DDP) call one forward that
returns either logits or the final hidden states (for the fused LM-head loss),
and gives auxiliary modules (projections for representation transfer, early-
exit heads) a home that trains with the student but is left out at export.
"""

from __future__ import annotations

import torch
from torch import nn

from alambic.losses.logit_transform import LogitTransform, logit_transform_of, verify_logit_transform


class StudentModule(nn.Module):
    def __init__(self, model: nn.Module, vocab_size: int | None = None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.auxiliary = nn.ModuleDict()
        self._logit_transform: LogitTransform | None = None

    def head_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM-head weight and bias, trimmed to the tokenizer's vocabulary."""
        head = self.model.get_output_embeddings()
        weight = head.weight if self.vocab_size is None else head.weight[: self.vocab_size]
        bias = getattr(head, "bias", None)
        if bias is not None and self.vocab_size is not None:
            bias = bias[: self.vocab_size]
        return weight, bias

    def supports_fused_head(self) -> bool:
        """The fused loss needs `base_model` hidden states followed by a plain linear head."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return isinstance(head, nn.Linear) and self.model.base_model is not self.model

    def logit_transform(self) -> LogitTransform:
        """What the model's forward() does after its head (Gemma soft-capping, Granite / Cohere
        scaling), checked once against forward() on a probe input; ModelError if not reproducible."""
        if self._logit_transform is None:
            transform = logit_transform_of(self.model)
            verify_logit_transform(self.model, transform, "student")
            self._logit_transform = transform
        return self._logit_transform

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden_only: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> dict:
        inputs = {"input_ids": input_ids}
        if position_ids is not None:
            inputs["position_ids"] = position_ids  # packed rows: block-diagonal causal mask
        else:
            inputs["attention_mask"] = attention_mask
        extra = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        if hidden_only:
            outputs = self.model.base_model(**inputs, use_cache=False, **extra)
            return {
                "hidden": outputs.last_hidden_state,
                "hidden_states": outputs.hidden_states,
                "attentions": outputs.attentions,
            }
        if getattr(self.model.config, "is_decoder", False) or hasattr(self.model, "generate"):
            extra["use_cache"] = False
        try:
            outputs = self.model(**inputs, **extra)
        except TypeError:  # classifiers without use_cache
            extra.pop("use_cache", None)
            outputs = self.model(**inputs, **extra)
        logits = outputs.logits
        # Only a padded head is cut: a slice is a view even when it keeps every column, and
        # FSDP warns about every view a wrapped module returns.
        if self.vocab_size is not None and logits.dim() == 3 and logits.shape[-1] > self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return {"logits": logits, "hidden_states": outputs.hidden_states, "attentions": outputs.attentions}


def student_module(student) -> StudentModule:
    """The StudentModule behind a DDP / compiled wrapper."""
    inner = student
    while hasattr(inner, "module"):
        inner = inner.module
    return inner
