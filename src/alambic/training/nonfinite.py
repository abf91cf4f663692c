"""The non-finite guard: a NaN or infinite loss or gradient never reaches the weights or the export.

Each step, before the optimiser moves the weights, the loop asks `step_ok`.
A non-finite loss or gradient skips the step (nothing is applied, the
gradients are dropped) up to `train.nonfinite_skips` times in a run; one more
stops the run with exit code 3 and a message naming the step, the value and
the last good checkpoint. Checkpoints and the final export refuse weights that
are not finite, so neither ever holds a NaN model.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from alambic.training.checkpoint import list_checkpoints
from alambic.training.finite import HINT, NonFiniteError, check_finite_weights  # noqa: F401  (re-exported)


def _last_checkpoint(run_dir: Path) -> str:
    checkpoints = list_checkpoints(run_dir)
    return f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved"


def _grads_finite(parameters) -> bool:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))


class NonFiniteGuard:
    def __init__(self, max_skips: int, run_dir: Path, accelerator=None):
        self.max_skips = max_skips
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.skipped: list[int] = []

    def _all_ranks_finite(self, finite: bool) -> bool:
        accelerator = self.accelerator
        if accelerator is None or accelerator.num_processes == 1:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
        return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0

    def step_ok(self, step: int, loss: float, grad_norm: float | None, model) -> bool:
        """True: apply the step. False: skip it. Raises NonFiniteError once the skips are used up."""
        loss_finite = math.isfinite(loss)
        grads_finite = math.isfinite(grad_norm) if grad_norm is not None else _grads_finite(model.parameters())
        if self._all_ranks_finite(loss_finite and grads_finite):
            return True
        what = f"loss {loss}" if not loss_finite else "gradient (norm " + (f"{grad_norm})" if grad_norm is not None else "not finite)")
        self.skipped.append(step)
        if len(self.skipped) > self.max_skips:
            skipped = f" after skipping {len(self.skipped) - 1} step(s)" if self.max_skips else ""
            raise NonFiniteError(
                f"training stopped at step {step}: non-finite {what}{skipped}; no model was exported and "
                f"{_last_checkpoint(self.run_dir)}",
                HINT,
            )
        print(f"warning: step {step} skipped: non-finite {what} ({len(self.skipped)}/{self.max_skips} skips used)",
              file=sys.stderr)
        return False
