"""Batches of token windows for training, from shards (np.memmap) or from in-memory ids.

Two shard loaders, both rank-aware and resumable from a small state dict:
- RandomWindows: each step draws `batch_size` random windows of context_length + 1 tokens
  (nanoGPT's get_batch). The draw of step s comes from a generator seeded by
  (seed, rank, s), so the state is just the step number.
- SequentialWindows: epochs without replacement over non-overlapping windows, in an order
  shuffled per epoch by (seed, epoch); the state is (epoch, position).
With world_size > 1, RandomWindows gives each rank its own contiguous slice of the tokens and
SequentialWindows gives each rank every world_size-th window of the shuffled order, so ranks
never read the same window, and N ranks with 1/N of the accumulation steps read, step by step,
exactly the windows one process reads (within an epoch). Every rank's position is the same,
so rank 0's state resumes them all; SequentialWindows rescales it to another world size.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.data.shards import check_shards
from scratchllm.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs and targets, each (B, T) int64


def load_tokens(data_dir: str | Path, split: str = "train", tokenizer=None) -> np.ndarray:
    """The tokens of one split as a read-only memmap, after checking the shards' meta.json."""
    meta = check_shards(data_dir, tokenizer)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no split {split!r} (it has {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    if info["tokens"] == 0:
        raise UserError(f"the {split} split in {data_dir} is empty; prepare with a larger "
                        "corpus or a different --val-fraction")
    return np.memmap(Path(data_dir) / info["file"], dtype=np.dtype(meta["dtype"]), mode="r")


def _windows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> Batch:
    index = starts[:, None] + np.arange(context_length + 1)  # (B, T + 1)
    chunk = torch.from_numpy(tokens[index].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def _check_length(n_tokens: int, context_length: int, what: str) -> None:
    if n_tokens < context_length + 1:
        raise UserError(f"{what} has {n_tokens} tokens, fewer than context_length + 1 = "
                        f"{context_length + 1}; use a shorter context or more data")


class RandomWindows:
    """Random windows, seeded per (seed, rank, step); optionally starting at documents."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, align_to_documents: bool = False,
                 eot_id: int | None = None):
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.seed, self.rank, self.step = seed, rank, 0
        n = len(tokens)
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        part = "these tokens" if world_size == 1 else f"rank {rank}'s part of these tokens"
        _check_length(self.hi - self.lo, context_length, part)
        last_start = self.hi - (context_length + 1)
        self.starts: np.ndarray | None = None
        if align_to_documents:
            if eot_id is None:
                raise UserError("document-aligned windows need the <|endoftext|> id (eot_id)")
            part = np.asarray(tokens[self.lo : self.hi])
            starts = np.concatenate([[0], np.flatnonzero(part == eot_id) + 1]) + self.lo
            self.starts = starts[starts <= last_start]
            if len(self.starts) == 0:
                raise UserError("no document starts a full window; use a shorter context")
        self.last_start = last_start

    def next_batch(self) -> Batch:
        """The batch for the current step; advances the step."""
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        if self.starts is not None:
            starts = self.starts[rng.integers(0, len(self.starts), self.batch_size)]
        else:
            starts = rng.integers(self.lo, self.last_start + 1, self.batch_size)
        self.step += 1
        return _windows(self.tokens, starts, self.context_length)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "seed": self.seed, "rank": self.rank, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "random", self.seed)
        self.step = int(state["step"])


class SequentialWindows:
    """Epochs over non-overlapping windows in a shuffled order; each window once per epoch."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        _check_length(len(tokens), context_length, "the data")
        self.n_windows = (len(tokens) - 1) // context_length
        # Every rank gets the same number of windows, so all ranks take the same steps.
        self.per_rank = self.n_windows // world_size
        if self.per_rank < batch_size:
            raise UserError(f"only {self.per_rank} windows per rank, fewer than the batch size "
                            f"{batch_size}; use a smaller batch or context, or more data")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        order = np.arange(self.n_windows)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
        return order[self.rank :: self.world_size][: self.per_rank]

    @property
    def steps_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def next_batch(self) -> Batch:
        """The next batch; a new shuffled epoch starts when too few windows are left."""
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        picked = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return _windows(self.tokens, picked * self.context_length, self.context_length)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sequential", "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "sequential", self.seed)
        # Windows read so far by all ranks, shared out over this run's ranks.
        read = int(state["position"]) * int(state.get("world_size", 1))
        self.epoch, self.position = int(state["epoch"]), read // self.world_size
        self._order = self._epoch_order()


def _check_state(state: dict[str, Any], kind: str, seed: int) -> None:
    if state.get("kind") != kind or state.get("seed") != seed:
        raise UserError(f"loader state {state} does not belong to this {kind} loader "
                        f"(seed {seed}): resume with the same data.loader and train.seed")


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Windows of a token list taken every `stride` tokens (the book's GPTDatasetV1)."""

    def __init__(self, token_ids: list[int] | np.ndarray, context_length: int, stride: int):
        if stride < 1:
            raise UserError(f"stride must be at least 1, got {stride}")
        _check_length(len(token_ids), context_length, "the text")
        self.ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        self.context_length = context_length
        self.starts = range(0, len(token_ids) - context_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Batch:
        start = self.starts[i]
        chunk = self.ids[start : start + self.context_length + 1]
        return chunk[:-1], chunk[1:]


def text_dataloader(text: str, tokenizer, batch_size: int = 4, context_length: int = 256,
                    stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                    seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader of sliding windows over a small text (the book's create_dataloader_v1)."""
    dataset = SlidingWindowDataset(tokenizer.encode(text, allowed_special="all"),
                                   context_length, stride)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       drop_last=drop_last, generator=generator)
