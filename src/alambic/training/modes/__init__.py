"""Distillation modes as configuration of the one loop.

Each module here reads its config section and plugs into the loop's hooks on
`RunModels` (see training/setup.py): `teacher` (the signal source), `rollout`
(batch -> batch before the loss: on-policy sampling, teacher samples),
`extra_terms` (added loss terms: representation transfer, early exits, peers)
and `after_step` (EMA teachers). A mode module exposes `configure(setup, config)`.
"""

from __future__ import annotations

import importlib

MODE_MODULES = (
    "ensemble", "self_distill", "co_distill", "cross_tokenizer", "representation", "interchange", "rollouts",
    "quantization",  # last: fake-quantizes the student after every mode has set it up
)


def configure_modes(setup, config) -> None:
    for name in MODE_MODULES:
        try:
            module = importlib.import_module(f"alambic.training.modes.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"alambic.training.modes.{name}":
                continue
            raise
        module.configure(setup, config)
