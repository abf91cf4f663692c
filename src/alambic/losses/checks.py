"""Range checks shared by every loss function (plain, sparse, fused).

A loss parameter out of range does not fail loudly by itself: a NaN or
infinite temperature turns every value into NaN, beta = 1.5 gives a negative
"divergence", top_k = 0 an empty support. Each public loss function calls
`check_loss_parameters` first, so such values raise here, before any tensor is
touched. `LossParameterError` is both a `ConfigError` (the CLI prints it and
exits with 2) and a `ValueError` (what callers of pure functions expect).

Ranges: temperature finite and > 0; alpha and beta in [0, 1]; skew_alpha in
(0, 1) (a = 0 is the plain KL of that direction: use forward_kl / reverse_kl;
a = 1 compares a distribution with itself and is always 0); top_k None or >= 1;
logit_softcap None or finite and > 0.
"""

from __future__ import annotations

import math
import numbers

from alambic.errors import ConfigError
from alambic.objective_names import OBJECTIVES


class LossParameterError(ConfigError, ValueError):
    """A loss parameter outside its range (exit 2 from the CLI, ValueError for library callers)."""


def _number(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LossParameterError(f"{where}: {name} must be a number, got {value!r}", hint=f"set loss.{name} to a number")
    value = float(value)
    if not math.isfinite(value):
        raise LossParameterError(f"{where}: {name} must be finite, got {value}", hint=f"set loss.{name} to a finite number")
    return value


def check_loss_parameters(
    where: str,
    *,
    objective: str | None = None,
    temperature: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    skew_alpha: float | None = None,
    top_k=None,
    logit_softcap: float | None = None,
) -> None:
    """Raise LossParameterError naming the first parameter out of range; None skips a check."""
    if objective is not None and objective not in OBJECTIVES:
        raise LossParameterError(
            f"{where}: unknown objective {objective!r}", hint=f"choose one of {', '.join(OBJECTIVES)}"
        )
    if temperature is not None and not _number("temperature", temperature, where) > 0:
        raise LossParameterError(f"{where}: temperature must be > 0, got {temperature}", hint="e.g. loss.temperature=1.0")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None and not 0.0 <= _number(name, value, where) <= 1.0:
            raise LossParameterError(f"{where}: {name} must be in [0, 1], got {value}", hint=f"set loss.{name} between 0 and 1")
    if skew_alpha is not None and not 0.0 < _number("skew_alpha", skew_alpha, where) < 1.0:
        raise LossParameterError(
            f"{where}: skew_alpha must be in (0, 1), got {skew_alpha}",
            hint="DistiLLM uses 0.1; for skew_alpha 0 use objective forward_kl / reverse_kl",
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise LossParameterError(f"{where}: top_k must be None or an integer >= 1, got {top_k!r}", hint="e.g. loss.top_k=64")
    if logit_softcap is not None and not _number("logit_softcap", logit_softcap, where) > 0:
        raise LossParameterError(f"{where}: logit_softcap must be > 0, got {logit_softcap}", hint="Gemma 2 uses 30.0")
