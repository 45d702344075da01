"""Labelled texts for classification: the SMS spam set, CSV/TSV/JSONL files, splits, batches.

A batch is (ids, labels, lengths): ids right-padded to the longest text of the batch (never to
the full context), labels as class ids, lengths the real token counts (the classifier reads the
last real token). Training batches are shuffled per epoch from a seed and resume exactly.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.data.epochs import EpochOrder
from scratchllm.errors import UserError
from scratchllm.fileio import json_line

SPLITS = ("train", "val", "test")


@dataclass
class LabelledSplits:
    """(text, label) pairs per split, and the label names (sorted: their order is the id)."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    labels: list[str]

    def split(self, name: str) -> list[tuple[str, str]]:
        return getattr(self, name)

    def label_ids(self, name: str) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label] for _, label in self.split(name)]


def load_classification(source: str, text_field: str = "text", label_field: str = "label",
                        balance: bool = False, seed: int = 123) -> LabelledSplits:
    """Splits of a named set (`sms-spam`) or a CSV/TSV/JSONL file, 70/10/20 with `seed`.

    sms-spam follows the book: "ham" is undersampled to the number of "spam" messages.
    balance=True does the same for any file (every class cut to the smallest class's size).
    """
    if source == "sms-spam":
        from scratchllm.data import registry

        path = registry.files("sms-spam")[0]
        examples = _read_sms(path)
        balance = True
    else:
        examples = read_labelled(Path(source), text_field, label_field)
    labels = sorted({label for _, label in examples})
    if len(labels) < 2:
        raise UserError(f"{source} has only one label ({labels[0]!r}): a classifier needs at "
                        "least two")
    if balance:
        examples = _undersample(examples, seed)
    return LabelledSplits(*_split(examples, seed), labels=labels)


def _read_sms(path: Path) -> list[tuple[str, str]]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if text:
            examples.append((text, label))
    return examples


def read_labelled(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(text, label) of every record of a .csv, .tsv, .jsonl or .json file; labels as strings."""
    if not path.is_file():
        raise UserError(f"{path} not found: give a .csv, .tsv, .jsonl or .json file of labelled "
                        "texts, or the name sms-spam")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix in (".csv", ".tsv"):
        records: list[dict[str, Any]] = list(csv.DictReader(
            text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        records = [json_line(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    elif suffix == ".json":
        records = json_line(text, str(path))
        if not isinstance(records, list):
            raise UserError(f"{path} must hold a JSON list of records")
    else:
        raise UserError(f"{path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or .json")
    if not records:
        raise UserError(f"{path} holds no records: give a file of labelled texts")
    fields = list(records[0]) if isinstance(records[0], dict) else []
    for name, what in ((text_field, "--text-field"), (label_field, "--label-field")):
        if name not in fields:
            raise UserError(f"{path} has no field {name!r} (fields: {', '.join(fields)}); "
                            f"name the right one with {what}")
    examples = []
    for record in records:
        text_value, label = record.get(text_field), record.get(label_field)
        if text_value is None or label is None or not str(text_value).strip():
            continue
        examples.append((str(text_value), str(label)))
    if not examples:
        raise UserError(f"{path} has no record with both a text and a label")
    return examples


def _undersample(examples: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Every class cut to the size of the smallest, keeping a seeded random subset."""
    rng = np.random.default_rng(seed)
    counts = Counter(label for _, label in examples)
    smallest = min(counts.values())
    kept = []
    for label in sorted(counts):
        members = [e for e in examples if e[1] == label]
        keep = rng.choice(len(members), size=smallest, replace=False)
        kept += [members[i] for i in sorted(keep)]
    return kept


def _split(examples: list[tuple[str, str]], seed: int, train: float = 0.7, val: float = 0.1):
    """Shuffle with `seed`, then the first 70% train, the next 10% validation, the rest test."""
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    a = int(len(shuffled) * train)
    b = a + int(len(shuffled) * val)
    return shuffled[:a], shuffled[a:b], shuffled[b:]


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, cut to max_length tokens; and how many texts were cut."""
    ids, cut = [], 0
    for text in texts:
        row = tokenizer.encode(text)
        if len(row) > max_length:
            row, cut = row[:max_length], cut + 1
        ids.append(row or [tokenizer.eot_id])  # an empty text still gives the head one token
    return ids, cut


def pad_batch(rows: list[list[int]], labels: list[int], pad_id: int):
    """(ids (B, L) right-padded to the longest row, labels (B,), lengths (B,))."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor(labels), lengths


class ClassificationBatches(EpochOrder):
    """Shuffled training batches (ids, labels, lengths), a new order each epoch, resumable."""

    def __init__(self, rows: list[list[int]], labels: list[int], batch_size: int, pad_id: int,
                 seed: int = 0):
        super().__init__(len(rows), batch_size, seed, "classification")
        self.rows, self.labels, self.pad_id = rows, labels, pad_id

    def next_batch(self):
        take = self.next_indices()
        return pad_batch([self.rows[i] for i in take], [self.labels[i] for i in take],
                         self.pad_id)


def eval_batches(rows: list[list[int]], labels: list[int], batch_size: int, pad_id: int):
    """Every example once, in order, in batches (the last one may be smaller)."""
    for start in range(0, len(rows), batch_size):
        yield pad_batch(rows[start:start + batch_size], labels[start:start + batch_size], pad_id)
