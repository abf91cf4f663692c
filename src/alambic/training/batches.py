"""Which rows each optimiser step reads: a pure function of (step, seed).

The order is a seeded permutation per epoch, so resuming at step k needs no
replay of earlier batches, and every rank of a DDP run computes the same global
batch and takes its own slice of it.
"""

from __future__ import annotations

import random


class BatchPlan:
    def __init__(self, n_rows: int, batch_size: int, world_size: int, grad_accum: int, seed: int):
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n_rows))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            # Plans are read forward (a served teacher's prefetch reads a few steps ahead): keep two epochs.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1} | {epoch: order}
        return self._orders[epoch]

    def row(self, sample: int) -> int:
        return self._order(sample // self.n_rows)[sample % self.n_rows]

    def step_indices(self, step: int) -> list[list[int]]:
        """Global row indices of each micro-batch of optimiser step `step` (0-based)."""
        global_micro = self.batch_size * self.world_size
        first = step * self.grad_accum * global_micro
        return [
            [self.row(first + micro * global_micro + j) for j in range(global_micro)]
            for micro in range(self.grad_accum)
        ]

    def rank_slice(self, global_indices: list[int], rank: int) -> list[int]:
        return global_indices[rank * self.batch_size : (rank + 1) * self.batch_size]
