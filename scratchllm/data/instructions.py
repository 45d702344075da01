"""Instruction data: the book's set, Alpaca-style JSON/JSONL, OpenAI-style conversations.

Every example is either an Alpaca record {"instruction", "input", "output"} or a conversation
{"messages": [{"role", "content"}, ...]}; data/chat.py renders both. Splits follow the book:
in file order, the first 85% train, the next 10% test, the last 5% validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.errors import UserError

SPLITS = ("train", "val", "test")


def load_instructions(source: str) -> list[dict[str, Any]]:
    """The examples of `instruction-data` (the book's 1,100) or of a .json/.jsonl file."""
    if source == "instruction-data":
        from scratchllm.data import registry

        path = registry.files("instruction-data")[0]
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{path} not found: give instruction-data or a .json/.jsonl file of "
                            "Alpaca records or {\"messages\": [...]} conversations")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} holds no examples: give a list of records")
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict) or not ("messages" in record or (
                "instruction" in record and "output" in record)):
            raise UserError(f"{path}: example {n} has neither 'messages' nor 'instruction' and "
                            "'output'")
    return records


def split_book(examples: list) -> dict[str, list]:
    """The book's split, in file order: 85% train, then 10% test, the last 5% validation."""
    n_train, n_test = int(len(examples) * 0.85), int(len(examples) * 0.1)
    return {"train": examples[:n_train], "test": examples[n_train:n_train + n_test],
            "val": examples[n_train + n_test:]}


class SFTBatches:
    """Rendered (ids, mask) examples in shuffled batches, a new order each epoch (seeded),
    padded to the longest of the batch; resumable. The last partial batch of an epoch is
    dropped so every step is full."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batch_size: int,
                 pad_id: int, seed: int = 0):
        if len(examples) < batch_size:
            raise UserError(f"the training split has {len(examples)} examples, fewer than "
                            f"train.batch_size = {batch_size}: lower the batch size")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.index = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        from scratchllm.data.chat import pad_sft_batch

        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.examples))
        take = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return pad_sft_batch([self.examples[i] for i in take], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sft", "epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sft" or state.get("seed") != self.seed:
            raise UserError("the checkpoint's data position belongs to another run: resume with "
                            "the same data and train.seed")
        self.epoch, self.index = state["epoch"], state["index"]
