"""Epochs over a fixed set of examples: a new seeded order each epoch, full batches, resumable.

Shared by the fine-tuning batchers (classification, instructions, preference pairs): each asks
`next_indices()` for the examples of its next batch and turns them into tensors its own way.
Under data parallelism each of N ranks takes every N-th example of a global batch N times
larger, so N ranks read, step by step, exactly the examples one process reads with N times
the accumulation (the state is the same on every rank).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchllm.errors import UserError


class EpochOrder:
    """Batch after batch of example indices: each epoch a permutation seeded by (seed, epoch);
    the last partial batch of an epoch is dropped (as the book's DataLoader does)."""

    def __init__(self, n_examples: int, batch_size: int, seed: int, kind: str,
                 what: str = "the training split", rank: int = 0, world_size: int = 1):
        self.global_batch = batch_size * world_size
        if n_examples < self.global_batch:
            ranks = f" x {world_size} data-parallel ranks" if world_size > 1 else ""
            raise UserError(f"{what} has {n_examples} examples, fewer than train.batch_size = "
                            f"{batch_size}{ranks}: lower the batch size")
        self.n, self.batch_size, self.seed, self.kind = n_examples, batch_size, seed, kind
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0

    def shard(self, rank: int, world_size: int) -> None:
        """Read rank's part of each global batch of batch_size x world_size examples."""
        if self.n < self.batch_size * world_size:
            raise UserError(f"{self.n} examples, fewer than train.batch_size = {self.batch_size}"
                            f" x {world_size} data-parallel ranks: lower the batch size")
        self.rank, self.world_size = rank, world_size
        self.global_batch = self.batch_size * world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def next_indices(self) -> np.ndarray:
        """The example indices of this rank's part of the next batch (advancing to a new epoch
        when one ends)."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
        take = order[self.index * self.global_batch:(self.index + 1) * self.global_batch]
        self.index += 1
        return take[self.rank::self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("seed") != self.seed:
            raise UserError("the checkpoint's data position belongs to another run: resume with "
                            "the same data and train.seed")
        self.epoch, self.index = state["epoch"], state["index"]
