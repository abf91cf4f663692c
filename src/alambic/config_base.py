"""`Strict`: the one base of every config section (run, modes, generate, init-student, demos, ...).

Unknown keys are errors (alambic.config turns them into a message that names
the key and suggests the closest valid one); fields may be given by name or by
alias (e.g. rollout.lambda for `lambda_`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    # Non-finite numbers (.inf, .nan) are refused everywhere: a NaN temperature trains a NaN model.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True, allow_inf_nan=False)
