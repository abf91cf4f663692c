"""Finite weights only: the one check before any model is written (checkpoint or export).

Kept apart from the step guard (nonfinite.py) so that checkpoint.py and
export.py can use it without importing the training loop's pieces.
"""

from __future__ import annotations

import torch

from alambic.errors import AlambicError

EXIT_NONFINITE = 3
HINT = (
    "lower train.lr, check loss.temperature and the data; to ride out rare bad batches, set "
    "train.nonfinite_skips=K; the run resumes from its last checkpoint when started again"
)


class NonFiniteError(AlambicError):
    """Training produced NaN/inf: not the user's typo, but the run cannot go on (exit code 3)."""

    exit_code = EXIT_NONFINITE


def check_finite_weights(weights: torch.nn.Module | dict, what: str) -> None:
    """Refuse to write `what` from weights (a module, or a full state dict) holding NaN or inf."""
    tensors = weights if isinstance(weights, dict) else weights.state_dict()
    for name, tensor in tensors.items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard: judge the whole tensor
            tensor = tensor.full_tensor()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"the model's weights are not finite (e.g. {name}): the {what} is not written", HINT)
