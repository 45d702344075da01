"""Instruction data: the book's set, Alpaca-style JSON/JSONL, OpenAI-style conversations.

Every example is either an Alpaca record {"instruction", "input", "output"} or a conversation
{"messages": [{"role", "content"}, ...]}; data/chat.py renders both. They come from a named
dataset (its JSON/JSONL file), a .json/.jsonl file, or a Hugging Face dataset
(`hf:NAME[:CONFIG][@SPLIT]`, streamed as data/sources.py streams pretraining text). A field
mapping renames a source's own keys to these (`instruction=question,output=answer` for GSM8K).
Splits follow the book: in file order, the first 85% train, the next 10% test, the last 5%
validation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.data.epochs import EpochOrder
from scratchllm.errors import UserError
from scratchllm.fileio import read_utf8

SPLITS = ("train", "val", "test")


FIELDS = ("instruction", "input", "output", "messages")  # what a field mapping may fill


def load_instructions(source: str, fields: Mapping[str, str] | Sequence[str] | str = ()
                      ) -> list[dict[str, Any]]:
    """The examples of a named dataset (e.g. instruction-data, the book's 1,100), an hf:
    dataset, or a .json/.jsonl file; `fields` maps our keys to the source's, e.g.
    {"instruction": "question", "output": "answer"} (or "instruction=question,output=answer")."""
    mapping = parse_fields(fields)
    if source.startswith("hf:"):
        from scratchllm.data.sources import hf_records

        origin, records = source, list(hf_records(source[3:]))
    else:
        path = _instruction_file(source)
        origin, records = str(path), _read_records(path)
    if not isinstance(records, list) or not records:
        raise UserError(f"{origin} holds no examples: give a list of records")
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise UserError(f"{origin}: example {n} is not a JSON object")
        if mapping:
            records[n - 1] = record = _renamed(record, mapping, f"{origin}: example {n}")
        if not ("messages" in record or ("instruction" in record and "output" in record)):
            keys = ", ".join(map(repr, list(record)[:8]))
            raise UserError(f"{origin}: example {n} has neither 'messages' nor 'instruction' and "
                            f"'output' (it has {keys}); map its fields, e.g. --fields "
                            "instruction=question,output=answer")
    return records


def parse_fields(fields: Mapping[str, str] | Sequence[str] | str) -> dict[str, str]:
    """{our key: the source's key} from a dict, ["instruction=question", ...] or a comma list."""
    if isinstance(fields, Mapping):
        pairs = list(fields.items())
    else:
        items = fields.split(",") if isinstance(fields, str) else list(fields)
        pairs = []
        for item in (i.strip() for i in items if i.strip()):
            ours, sep, theirs = item.partition("=")
            if not sep or not ours.strip() or not theirs.strip():
                raise UserError(f"cannot read field mapping {item!r}: write OURS=THEIRS, e.g. "
                                "instruction=question,output=answer")
            pairs.append((ours.strip(), theirs.strip()))
    for ours, _ in pairs:
        if ours not in FIELDS:
            raise UserError(f"unknown field {ours!r} in the field mapping: map any of "
                            f"{', '.join(FIELDS)} (e.g. instruction=question)")
    return dict(pairs)


def _renamed(record: dict[str, Any], mapping: dict[str, str], where: str) -> dict[str, Any]:
    """The record with our keys filled from the source's (the mapped-from keys dropped)."""
    missing = [theirs for theirs in mapping.values() if theirs not in record]
    if missing:
        keys = ", ".join(map(repr, list(record)[:8]))
        raise UserError(f"{where} has no field {missing[0]!r} (it has {keys}): fix the field "
                        "mapping")
    out = {k: v for k, v in record.items() if k not in mapping.values()}
    out.update({ours: record[theirs] for ours, theirs in mapping.items()})
    return out


def _instruction_file(source: str) -> Path:
    """The JSON/JSONL file of a named dataset or a path."""
    from scratchllm.data import registry

    if source not in registry.DATASETS:
        path = Path(source)
        if path.is_file():
            return path
        if path.suffix.lower() in (".json", ".jsonl") or "/" in source or "\\" in source:
            raise UserError(f"{path} not found: give instruction-data, a .json/.jsonl file of "
                            "Alpaca records or {\"messages\": [...]} conversations, or hf:NAME")
    path = registry.files(source)[0]  # another name raises, listing the known datasets
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise UserError(f"the dataset {source} is not instruction data (no JSON records): "
                        "give instruction-data, a .json/.jsonl file or an hf: dataset")
    return path


def _read_records(path: Path) -> Any:
    """The decoded records of a .json (one array) or .jsonl (one object a line) file."""
    text = read_utf8(path, "give a UTF-8 JSON or JSONL file")
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


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
