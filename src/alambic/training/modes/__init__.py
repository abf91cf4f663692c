"""Distillation modes as configuration of the one loop.

Each module here reads its config section and plugs into the run's hooks on
`RunSetup` (training/setup.py): `teacher` (the signal source), `rollout`
(batch -> batch before the loss: on-policy sampling, teacher samples),
`extra_terms` (added loss terms: representation transfer, early exits, peers)
and `after_step` / `after_train` (EMA teachers, saving peers). How a module
plugs in (its optional `teacher` and `configure` functions) and why the order
does not matter: training/modes/base.py.
"""

from __future__ import annotations

import importlib

from alambic.training.modes.base import TeacherChoice, mode_rng

MODE_MODULES = (
    "ensemble", "self_distill", "co_distill", "cross_tokenizer", "representation", "rollouts", "interchange",
    "quantization",
)


def _modes(order=None) -> list[tuple[str, object]]:
    names = MODE_MODULES if order is None else tuple(order)
    if sorted(names) != sorted(MODE_MODULES):
        raise ValueError(f"a mode order must name each of {MODE_MODULES} once (got {names})")
    return [(name, importlib.import_module(f"alambic.training.modes.{name}")) for name in names]


def choose_teacher(setup, config, order=None) -> TeacherChoice | None:
    """The teacher a mode provides, or None when no mode brings its own (the run's teacher section applies)."""
    chosen = []
    for name, module in _modes(order):
        provide = getattr(module, "teacher", None)
        if provide is None:
            continue
        with mode_rng(config.train.seed, name):
            choice = provide(setup, config)
        if choice is not None:
            chosen.append((name, choice))
    if len(chosen) > 1:
        names = ", ".join(name for name, _ in chosen)
        raise RuntimeError(f"modes {names} each provide the teacher; alambic.compat must refuse this combination")
    return chosen[0][1] if chosen else None


def configure_modes(setup, config, order=None) -> None:
    """Let every mode add its terms, rollout and hooks; the teacher is already chosen."""
    for name, module in _modes(order):
        configure = getattr(module, "configure", None)
        if configure is not None:
            with mode_rng(config.train.seed, name):
                configure(setup, config)
    setup.extra_terms.sort(key=lambda term: term.name)  # a fixed order of summation
