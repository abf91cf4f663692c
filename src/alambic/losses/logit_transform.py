"""What a model does to its logits after the LM head, reproduced for the fused loss.

The fused LM-head loss computes `hidden @ head.T (+ bias)` itself, so it must
apply whatever the model's own forward() applies next, or train on the wrong
distribution. Known transformations, read from the (text) config:
- `logit_scale` (Cohere, Cohere2, Aya Vision): logits * logit_scale
- `output_multiplier` (Muse): logits * output_multiplier
- `logits_scaling` (Granite family): logits / logits_scaling
- `final_logit_softcapping` (Gemma 2/3/3n/4, VaultGemma, PaliGemma, ...):
  cap * tanh(logits / cap), after any scale above.
So every supported head is z -> cap * tanh(scale * z / cap), with cap optional.
`loss.logit_softcap` adds one more cap inside the loss (`with_cap`).

`verify_logit_transform` runs the model once on a few tokens and compares
forward().logits with the transformation applied to head(base_model(...)): an
architecture that does something else after its head (an extra bias, a
hidden-state rescale, a learned cap) is refused with a clear message instead
of being trained on the wrong logits.

    python -c "from alambic.losses.logit_transform import LogitTransform as T; import torch; \
print(T(scale=0.5, caps=(30.0,)).apply(torch.tensor([100.0, -1.0])))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alambic.errors import ModelError

_SCALE_ATTRIBUTES = (("logit_scale", False), ("output_multiplier", False), ("logits_scaling", True))


@dataclass(frozen=True)
class LogitTransform:
    """z -> caps applied in order to (scale * z); each cap c maps y -> c * tanh(y / c)."""

    scale: float = 1.0
    caps: tuple[float, ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and not self.caps

    def with_cap(self, cap: float | None) -> LogitTransform:
        """This transformation followed by one more soft cap (None: unchanged)."""
        return self if cap is None else LogitTransform(self.scale, (*self.caps, float(cap)))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Out of place and differentiable by autograd."""
        if self.scale != 1.0:
            logits = logits * self.scale
        for cap in self.caps:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def apply_(self, logits: torch.Tensor, want_derivative: bool) -> torch.Tensor | float | None:
        """Transform `logits` in place; return d(out)/d(in) (a tensor, or a float when
        there is no cap) if asked, for the fused loss's closed-form gradient."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        derivative: torch.Tensor | float = self.scale
        for cap in self.caps:
            logits.div_(cap).tanh_()
            if want_derivative:  # d(c tanh(y / c))/dy = 1 - tanh^2
                factor = torch.mul(logits, logits).neg_().add_(1.0)
                derivative = factor.mul_(derivative) if isinstance(derivative, float) else derivative.mul_(factor)
            logits.mul_(cap)
        return derivative if want_derivative else None


IDENTITY = LogitTransform()


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else None
    return text if text is not None else config


def _positive_number(config, name: str, model_name: str) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"{model_name}: config.{name} = {value!r} is not a positive finite number")
    return float(value)


def logit_transform_of(model) -> LogitTransform:
    """The transformation `model.forward()` applies after its LM head, from its config."""
    config = _text_config(model.config)
    name = type(model).__name__
    scale = 1.0
    for attribute, divides in _SCALE_ATTRIBUTES:
        value = _positive_number(config, attribute, name)
        if value is not None:
            scale = scale / value if divides else scale * value
    cap = _positive_number(config, "final_logit_softcapping", name)
    return LogitTransform(scale, () if cap is None else (cap,))


def _probe_ids(model, tokens: int) -> torch.Tensor:
    vocab = model.get_output_embeddings().weight.shape[0]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        vocab = min(vocab, embeddings.num_embeddings)
    device = model.get_output_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, tokens), generator=generator).to(device)


@torch.no_grad()
def verify_logit_transform(model, transform: LogitTransform, role: str = "model", tokens: int = 8) -> None:
    """Raise ModelError unless forward().logits == transform(head(base_model hidden)) on a probe input."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or model.base_model is model:
        raise ModelError(
            f"the {role} ({type(model).__name__}) has no plain linear LM head after its base model, "
            "so the fused LM-head loss cannot compute its logits",
            hint="set loss.fused=false",
        )
    ids = _probe_ids(model, tokens)
    was_training = model.training
    model.eval()
    try:
        expected = model(input_ids=ids, use_cache=False).logits.float()
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        ours = transform.apply(head(hidden).float())
    finally:
        model.train(was_training)
    precision = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2
    tolerance = precision * (1.0 + float(expected.abs().max()))
    if expected.shape != ours.shape or float((expected - ours).abs().max()) > tolerance:
        raise ModelError(
            f"the {role} ({type(model).__name__}) transforms its logits after the LM head in a way alambic "
            f"does not reproduce (checked on a probe input; known: logit_scale, output_multiplier, "
            f"logits_scaling, final_logit_softcapping)",
            hint="set loss.fused=false to train on the model's own forward() logits",
        )
