"""Preference pairs for DPO: the book's polite/impolite set, Alpaca prompts, the 85/10/5 split.

The named set `preference-data` is a JSON array of {"instruction", "input", "output", "chosen",
"rejected"} objects. Each becomes a PreferencePair whose prompt is the Alpaca text up to and
including "### Response:\\n", so prompt + chosen is exactly alpaca_text(..., chosen).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scratchllm.data import registry
from scratchllm.data.formats import alpaca_text
from scratchllm.errors import UserError
from scratchllm.fileio import read_json

NAME = "preference-data"
REQUIRED = ("instruction", "chosen", "rejected")  # "input" may be absent or empty


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the Alpaca-formatted prompt, the preferred and the rejected response."""

    prompt: str
    chosen: str
    rejected: str
    instruction: str = ""  # the record's own fields, for templates other than Alpaca's
    input: str = ""

    def record(self, response: str) -> dict[str, str]:
        """The Alpaca record of this prompt with `response` as its output (for data/chat.py)."""
        return {"instruction": self.instruction, "input": self.input, "output": response}


@dataclass
class PreferenceSplits:
    """Pairs per split, in file order."""

    train: list[PreferencePair]
    val: list[PreferencePair]
    test: list[PreferencePair]

    def split(self, name: str) -> list[PreferencePair]:
        """The pairs of split `name` (train, val or test)."""
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def parse_pairs(records: object, origin: str) -> list[PreferencePair]:
    """PreferencePairs from decoded JSON records; a one-line UserError names a bad entry."""
    if not isinstance(records, list) or not records:
        raise UserError(f"{origin}: expected a non-empty JSON array of preference records")
    pairs = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{origin}: entry {i} is not an object with fields "
                            f"{', '.join(REQUIRED)}")
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise UserError(f"{origin}: entry {i} is missing field(s) {', '.join(missing)}; "
                            f"each entry needs {', '.join(REQUIRED)} (and optionally input)")
        fields = {key: record.get(key) or "" for key in (*REQUIRED, "input")}
        bad = [key for key, value in fields.items() if not isinstance(value, str)]
        if bad:
            raise UserError(f"{origin}: entry {i} field(s) {', '.join(bad)} must be text")
        empty = [key for key in REQUIRED if not fields[key].strip()]
        if empty:
            raise UserError(f"{origin}: entry {i} has empty {', '.join(empty)}")
        prompt = alpaca_text(fields["instruction"], fields["input"], "")
        pairs.append(PreferencePair(prompt, fields["chosen"], fields["rejected"],
                                    fields["instruction"], fields["input"]))
    return pairs


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """All pairs of a preference JSON file, in file order."""
    hint = "give a JSON list of {instruction, input, chosen, rejected} records"
    return parse_pairs(read_json(Path(path), hint), str(path))


def split_pairs(pairs: list[PreferencePair]) -> PreferenceSplits:
    """The book's split: first 85% train, next 10% test, the rest (5%) val; no shuffling."""
    n_train, n_test = int(len(pairs) * 0.85), int(len(pairs) * 0.1)
    return PreferenceSplits(train=pairs[:n_train], test=pairs[n_train:n_train + n_test],
                            val=pairs[n_train + n_test:])


def load_preference(source: str | Path = NAME, progress: bool = False) -> PreferenceSplits:
    """Split pairs of the named set `preference-data` (mirror or download) or of a JSON file."""
    if str(source) == NAME:
        path = registry.files(NAME, progress=progress)[0]
    elif Path(source).suffix == ".json" or Path(source).exists():
        path = Path(source)
    else:
        raise UserError(f"unknown preference data {str(source)!r}; use {NAME} or a .json file")
    return split_pairs(read_pairs(path))
