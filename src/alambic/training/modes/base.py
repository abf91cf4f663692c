"""What a mode module hands the run: the teacher it provides, and the order-free way modes are applied.

A mode module (training/modes/<name>.py) may define two functions, both optional:

- `teacher(setup, config) -> TeacherChoice | None`: the run's teacher signal
  source, when the mode brings one (self-distillation, co-distillation, a
  multi-teacher ensemble, cross-tokenizer). At most one mode provides it; the
  compatibility table (alambic.compat) refuses configs where two would.
- `configure(setup, config)`: everything else the mode adds to the one loop:
  extra loss terms, a rollout, after-step / after-train hooks, auxiliary
  modules. It may read what the teacher phase chose (setup.teacher,
  setup.teacher_model) and never changes what another mode reads.

All teachers are chosen before any mode is configured, each mode draws its
random initialisations from its own seeded stream, and the extra terms are
summed in a fixed order (by name): the result does not depend on the order
the modes are applied in (tests/recipes/test_mode_order.py).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class TeacherChoice:
    """The run's teacher: the signal source of the main logit loss (None: that loss is plain CE)."""

    source: object | None
    name: str | None
    evaluable: bool  # a dense signal on any text: held-out KL and agreement can be measured against it
    model: object | None = None  # the teacher's Hugging Face model, when one runs live
    tokenizer: object | None = None  # the teacher's tokenizer, when it is not the student's


@contextmanager
def mode_rng(seed: int, name: str):
    """Random initialisations of mode `name` from their own stream, seeded by (train.seed, name).

    The global stream is restored afterwards, so training's own randomness does
    not depend on which modes ran, or in which order.
    """
    digest = hashlib.sha256(f"alambic-mode:{seed}:{name}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        yield
