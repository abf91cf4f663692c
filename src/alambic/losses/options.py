"""LossOptions: the one description of the logit loss every path (dense, sparse, fused, extra terms) uses.

Built once from the config's `loss:` section and handed, whole, to whatever
computes a divergence: the loop's objective, the ensemble of teachers, the
co-distillation peers, early exits, the cross-tokenizer term. Nobody copies
the temperature out of it or drops a field on the way: a setting a path cannot
honour is refused (by `alambic.compat` before the run, and by the loss itself).

    python -c "from alambic.losses.options import LossOptions; print(LossOptions(objective='jsd').kwargs())"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class LossOptions:
    """objective, temperature T, alpha (hard-label CE weight), beta (JSD), skew_alpha, top_k of the teacher,
    logit_softcap (both logit tensors capped inside the loss, c * tanh(z / c))."""

    objective: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    top_k: int | None = None
    logit_softcap: float | None = None

    @classmethod
    def from_config(cls, loss_cfg) -> "LossOptions":
        """From a `LossConfig` (alambic.config)."""
        return cls(
            objective=loss_cfg.objective, temperature=loss_cfg.temperature, alpha=loss_cfg.alpha,
            beta=loss_cfg.beta, skew_alpha=loss_cfg.skew_alpha, top_k=loss_cfg.top_k,
            logit_softcap=getattr(loss_cfg, "logit_softcap", None),
        )

    def kwargs(self) -> dict:
        """Keyword arguments of the loss functions (per_token_distillation_loss, the sparse and fused twins)."""
        return asdict(self)

    def replace(self, **changes) -> "LossOptions":
        return replace(self, **changes)

    def check_signal_temperature(self, signal_temperature: float | None, source: str = "the teacher signal") -> None:
        """A signal stored at a fixed temperature (a top-k cache) can only be used at that temperature."""
        if signal_temperature is None:
            return
        from alambic.losses.sparse import check_cache_temperature

        check_cache_temperature(signal_temperature, self.temperature, source)
