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

from scratchllm.data.epochs import EpochOrder
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


class SFTBatches(EpochOrder):
    """Rendered (ids, mask) examples in shuffled batches, a new order each epoch, padded to the
    longest of the batch; resumable."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batch_size: int,
                 pad_id: int, seed: int = 0):
        super().__init__(len(examples), batch_size, seed, "sft")
        self.examples, self.pad_id = examples, pad_id

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        from scratchllm.data.chat import pad_sft_batch

        return pad_sft_batch([self.examples[i] for i in self.next_indices()], self.pad_id)


class PackedSFTBatches(EpochOrder):
    """The examples packed (in a seeded order) into full context windows once, then batches of
    windows in a new order each epoch: (inputs, targets, document ids, positions)."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], window: int,
                 batch_size: int, pad_id: int, seed: int = 0):
        from scratchllm.data.chat import pack

        order = np.random.default_rng(seed).permutation(len(examples))
        self.packed = pack([examples[i] for i in order], window, pad_id)
        super().__init__(len(self.packed.inputs), batch_size, seed, "sft-packed",
                         "the packed training windows")

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        take = torch.as_tensor(self.next_indices())
        p = self.packed
        return p.inputs[take], p.targets[take], p.doc_ids[take], p.positions[take]
