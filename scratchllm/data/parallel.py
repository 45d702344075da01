"""Parallel corpora for the encoder-decoder: (source, target) pairs, splits, batches by tokens.

A data spec is one of (several joined with '+'):
- a named set: tatoeba-fra-eng, tatoeba-deu-eng, tico19-en-fr (translation; from the registry,
  so offline mirrors and sha256 checks apply), or gutenberg-lead (a summarization smoke set:
  a Gutenberg paragraph -> its first sentence);
- two line-aligned files, 'SOURCE_FILE,TARGET_FILE' (line i of one translates line i of the
  other);
- a .tsv file (source TAB target per line), a .jsonl file ({"source", "target"} per line, or
  the fields you name), a .tmx translation memory (languages by xml:lang);
- hf:NAME[:CONFIG][@SPLIT] with the fields you name (e.g. CNN/DailyMail's article and
  highlights), streamed with the `datasets` library.

Named sets and TMX files know their languages: source_lang/target_lang pick the direction
(ISO 639-1 or -3 codes, 'fra' = 'fr'), and a language they do not hold is an error.

Examples are token ids: the source ends with eos; the decoder reads bos + target and predicts
target + eos. TokenBatches cuts them into batches of about max_tokens tokens (padding
included) of similar lengths, so little of each batch is padding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scratchllm.data import registry
from scratchllm.errors import UserError
from scratchllm.fileio import json_line, read_utf8
from scratchllm.model.loss import IGNORE_INDEX

Pair = tuple[str, str]
# ISO 639-3 / bibliographic codes -> ISO 639-1, so 'fra' (Tatoeba) and 'fr' (TICO-19) agree.
LANG_CODES = {"eng": "en", "fra": "fr", "fre": "fr", "deu": "de", "ger": "de", "spa": "es",
              "ita": "it", "por": "pt", "nld": "nl", "dut": "nl", "rus": "ru", "zho": "zh",
              "chi": "zh", "jpn": "ja", "ara": "ar"}


def lang_code(code: str) -> str:
    """A language code normalised to lower-case ISO 639-1 where we know it ('fra' -> 'fr')."""
    code = code.strip().lower().replace("_", "-")
    base = code.split("-")[0]  # en-US -> en
    return LANG_CODES.get(base, base)


@dataclass(frozen=True)
class Bitext:
    """Pairs in their native direction, with the two sides' languages (or roles)."""

    pairs: list[Pair]
    langs: tuple[str, str]
    origin: str

    def oriented(self, source_lang: str, target_lang: str) -> list[Pair]:
        """The pairs as (source, target) for the requested languages ('' = native order)."""
        if not source_lang and not target_lang:
            return self.pairs
        want = (lang_code(source_lang), lang_code(target_lang))
        if want == self.langs:
            return self.pairs
        if want == self.langs[::-1]:
            return [(b, a) for a, b in self.pairs]
        raise UserError(f"{self.origin} holds {self.langs[0]}-{self.langs[1]} pairs, not "
                        f"{want[0] or '?'}-{want[1] or '?'}: set source_lang and target_lang "
                        f"to {self.langs[0]} and {self.langs[1]} (either order)")


# ---- checks --------------------------------------------------------------------------------


def check_pairs(pairs: list[Pair], origin: str) -> list[Pair]:
    """Strip both sides; an empty side is an error naming the pair."""
    out = []
    for i, (a, b) in enumerate(pairs, 1):
        a, b = a.strip(), b.strip()
        if not a or not b:
            side = "source" if not a else "target"
            raise UserError(f"{origin}: pair {i} has an empty {side} side; remove the pair or "
                            "fill it in")
        out.append((a, b))
    if not out:
        raise UserError(f"{origin} holds no sentence pairs")
    return out


def _lines(path: Path) -> list[str]:
    text = read_utf8(path, "give an existing UTF-8 text file")
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # a final newline ends the last line


# ---- readers -------------------------------------------------------------------------------


def read_aligned(source_file: str | Path, target_file: str | Path) -> list[Pair]:
    """Pairs from two line-aligned files; different line counts are an error."""
    a, b = Path(source_file), Path(target_file)
    left, right = _lines(a), _lines(b)
    if len(left) != len(right):
        raise UserError(f"{a} has {len(left)} lines but {b} has {len(right)}: line-aligned files "
                        "need one line per sentence on both sides")
    return check_pairs(list(zip(left, right, strict=True)), f"{a},{b}")


def read_tsv(path: str | Path) -> list[Pair]:
    """Pairs from 'source TAB target' lines (blank lines skipped)."""
    pairs = []
    for n, line in enumerate(_lines(Path(path)), 1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) < 2:
            raise UserError(f"{path}:{n} has no TAB: write 'source<TAB>target' on every line")
        pairs.append((cells[0], cells[1]))
    return check_pairs(pairs, str(path))


def read_jsonl(path: str | Path, source_field: str = "source", target_field: str = "target"
               ) -> list[Pair]:
    """Pairs from JSON Lines records with a source and a target field."""
    pairs = []
    for n, line in enumerate(_lines(Path(path)), 1):
        if not line.strip():
            continue
        record = json_line(line, f"{path}:{n}")
        if not isinstance(record, dict) or source_field not in record \
                or target_field not in record:
            raise UserError(f"{path}:{n} needs the fields {source_field!r} and {target_field!r} "
                            "(name others with source_field / target_field)")
        pairs.append((str(record[source_field]), str(record[target_field])))
    return check_pairs(pairs, str(path))


def read_tmx_bitext(path: str | Path, source_lang: str = "", target_lang: str = "") -> Bitext:
    """The pairs of a TMX file for two of its languages (its only two by default)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: give an existing TMX file")
    units = [{lang_code(k): v for k, v in unit.items()} for unit in registry.read_tmx(path)]
    langs = sorted({lang for unit in units for lang in unit})
    if source_lang and target_lang:
        pair = (lang_code(source_lang), lang_code(target_lang))
    elif len(langs) == 2:
        first = lang_code(source_lang or target_lang or langs[0])
        pair = (first, next(lang for lang in langs if lang != first))
    else:
        raise UserError(f"{path} holds the languages {', '.join(langs) or 'none'}: set "
                        "source_lang and target_lang")
    missing = [lang for lang in pair if lang not in langs]
    if missing:
        raise UserError(f"{path} has no {missing[0]} segments (it holds {', '.join(langs)}): "
                        "set source_lang and target_lang to languages it holds")
    pairs = [(unit.get(pair[0], ""), unit.get(pair[1], "")) for unit in units]
    return Bitext(check_pairs(pairs, str(path)), pair, str(path))


def read_hf(spec: str, source_field: str, target_field: str, max_pairs: int = 0) -> list[Pair]:
    """Pairs streamed from a Hugging Face dataset, hf:NAME[:CONFIG][@SPLIT]."""
    from scratchllm.data.sources import _datasets, _hf_parts

    datasets = _datasets()
    name, config, split = _hf_parts(spec.removeprefix("hf:"))
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, auth and name errors all come from here
        raise UserError(f"cannot open HF dataset {name!r}: {e}") from None
    pairs = []
    for i, record in enumerate(stream):
        if source_field not in record or target_field not in record:
            raise UserError(f"{spec} records have the fields {', '.join(record)}, not "
                            f"{source_field!r} and {target_field!r}: set source_field and "
                            "target_field")
        pairs.append((str(record[source_field]), str(record[target_field])))
        if max_pairs and i + 1 >= max_pairs:
            break
    return check_pairs(pairs, spec)


# ---- named sets ----------------------------------------------------------------------------


def _aligned_set(name: str, langs: tuple[str, str]) -> Callable[[], Bitext]:
    def read() -> Bitext:
        first, second = registry.files(name)
        return Bitext(read_aligned(first, second), langs, name)
    return read


def _tico() -> Bitext:
    bitext = read_tmx_bitext(registry.files("tico19-en-fr")[0], "en", "fr")
    return Bitext(bitext.pairs, bitext.langs, "tico19-en-fr")


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


def lead_pairs(texts: list[str], max_pairs: int = 4000, min_sentences: int = 3,
               max_chars: int = 700) -> list[Pair]:
    """(paragraph, its first sentence) pairs: an extractive 'lead-1' summarization set that
    tests the machinery offline; it says nothing about abstractive summarization quality."""
    pairs = []
    for text in texts:
        for block in text.split("\n\n"):
            paragraph = " ".join(block.split())
            if not 200 <= len(paragraph) <= max_chars or paragraph.isupper():
                continue
            sentences = _SENTENCE_END.split(paragraph)
            if len(sentences) >= min_sentences and 20 <= len(sentences[0]) <= 200:
                pairs.append((paragraph, sentences[0]))
                if len(pairs) >= max_pairs:
                    return pairs
    return pairs


def _gutenberg_lead() -> Bitext:
    texts = list(registry.documents("gutenberg"))
    # Every book contributes: take paragraphs round-robin rather than the first books only.
    per_book = [lead_pairs([text], max_pairs=400) for text in texts]
    pairs = [p for group in per_book for p in group]
    return Bitext(check_pairs(pairs, "gutenberg-lead"), ("document", "summary"), "gutenberg-lead")


PARALLEL_SETS: dict[str, tuple[str, Callable[[], Bitext]]] = {
    "tatoeba-fra-eng": ("1,000 French-English Tatoeba pairs", _aligned_set(
        "tatoeba-fra-eng", ("fr", "en"))),
    "tatoeba-deu-eng": ("1,000 German-English Tatoeba pairs", _aligned_set(
        "tatoeba-deu-eng", ("de", "en"))),
    "tico19-en-fr": ("3,071 English-French TICO-19 (COVID-19, medical) pairs", _tico),
    "gutenberg-lead": ("summarization smoke set: Gutenberg paragraph -> its first sentence",
                       _gutenberg_lead),
}


# ---- one entry point -----------------------------------------------------------------------


def read_pairs(spec: str, source_lang: str = "", target_lang: str = "",
               source_field: str = "source", target_field: str = "target",
               max_pairs: int = 0) -> list[Pair]:
    """(source, target) pairs of a data spec (see the module docstring); '+' joins specs."""
    pairs: list[Pair] = []
    directions: dict[tuple[str, str], str] = {}  # native directions used, without languages
    for part in (p.strip() for p in spec.split("+")):
        if not part:
            raise UserError(f"empty part in the data spec {spec!r}: write A+B")
        more, langs = _read_one(part, source_lang, target_lang, source_field, target_field,
                                max_pairs)
        if langs is not None and not (source_lang or target_lang):
            directions.setdefault(langs, part)
        pairs += more
    if len(directions) > 1:  # e.g. fr-en and en-fr sets joined with no direction given
        named = ", ".join(f"{part} is {a}-{b}" for (a, b), part in directions.items())
        raise UserError(f"the parts of {spec!r} go different ways ({named}): set source_lang "
                        "and target_lang")
    return pairs[:max_pairs] if max_pairs else pairs


def _read_one(spec: str, source_lang: str, target_lang: str, source_field: str,
              target_field: str, max_pairs: int) -> tuple[list[Pair], tuple[str, str] | None]:
    """One part's pairs, and its native languages where it knows them."""
    bitext = None
    if spec in PARALLEL_SETS:
        bitext = PARALLEL_SETS[spec][1]()
    elif Path(spec).suffix.lower() == ".tmx" and "," not in spec:
        bitext = read_tmx_bitext(spec, source_lang, target_lang)
    if bitext is not None:
        return bitext.oriented(source_lang, target_lang), bitext.langs
    return _read_file(spec, source_field, target_field, max_pairs), None


def _read_file(spec: str, source_field: str, target_field: str, max_pairs: int) -> list[Pair]:
    if spec.startswith("hf:"):
        return read_hf(spec, source_field, target_field, max_pairs)
    if "," in spec:
        first, second = spec.split(",", 1)
        return read_aligned(first.strip(), second.strip())
    suffix = Path(spec).suffix.lower()
    if suffix == ".tsv":
        return read_tsv(spec)
    if suffix == ".jsonl":
        return read_jsonl(spec, source_field, target_field)
    known = ", ".join(PARALLEL_SETS)
    raise UserError(f"cannot read parallel data {spec!r}: give a named set ({known}), "
                    "SOURCE_FILE,TARGET_FILE, a .tsv, .jsonl or .tmx file, or hf:NAME")


def split_pairs(pairs: list[Pair], val_size: int, test_size: int, seed: int
                ) -> dict[str, list[Pair]]:
    """Deduplicated pairs shuffled (seeded) into test, val and train splits; a source never
    appears in two splits, so the held-out sets measure translation, not recall."""
    by_source: dict[str, list[Pair]] = {}
    for pair in dict.fromkeys(pairs):  # exact duplicates once
        by_source.setdefault(pair[0], []).append(pair)
    groups = list(by_source.values())
    order = np.random.default_rng(seed).permutation(len(groups))
    splits: dict[str, list[Pair]] = {"test": [], "val": [], "train": []}
    for i in order:
        name = ("test" if len(splits["test"]) < test_size else
                "val" if len(splits["val"]) < val_size else "train")
        splits[name] += groups[i]
    if len(splits["train"]) < 1:
        raise UserError(f"{len(pairs)} pairs leave nothing to train on after {test_size} test and "
                        f"{val_size} validation pairs: lower test_size / val_size")
    return splits


def write_tsv(path: Path, pairs: list[Pair]) -> None:
    """Pairs as 'source TAB target' lines (tabs and newlines inside a side become spaces)."""
    from scratchllm.fileio import atomic_write_text

    lines = [f"{' '.join(a.split())}\t{' '.join(b.split())}\n" for a, b in pairs]
    atomic_write_text(path, "".join(lines))


# ---- tokens --------------------------------------------------------------------------------


def train_tokenizer(pairs: list[Pair], vocab_size: int, progress: bool = False):
    """One byte-level BPE trained on both sides (shared embeddings need one vocabulary)."""
    from scratchllm.tokenizer import Tokenizer

    return Tokenizer.train([side for pair in pairs for side in pair], vocab_size,
                           progress=progress)


@dataclass
class Example:
    """One encoded pair: source ids (ending in eos) and target ids (without bos/eos)."""

    source: list[int]
    target: list[int]


def encode_pairs(tokenizer, pairs: list[Pair], eos_id: int, max_source: int, max_target: int
                 ) -> list[Example]:
    """Token ids of each pair, cut to max_source (eos included) and max_target - 1 target
    tokens (the decoder reads bos + target, max_target positions)."""
    sources = tokenizer.encode_batch([a for a, _ in pairs])
    targets = tokenizer.encode_batch([b for _, b in pairs])
    return [Example(s[:max_source - 1] + [eos_id], t[:max_target - 1])
            for s, t in zip(sources, targets, strict=True)]


def encode_source(tokenizer, text: str, eos_id: int, max_source: int) -> list[int]:
    """The source ids the model reads for `text` (cut to max_source, ending in eos)."""
    return tokenizer.encode(text)[:max_source - 1] + [eos_id]


def make_batch(examples: list[Example], pad_id: int, bos_id: int, eos_id: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(source ids, targets, decoder inputs, source mask), right-padded.

    source (B, S) padded with pad_id and mask (B, S), True = real; decoder inputs (B, T) =
    bos + target; targets (B, T) = target + eos, padded with IGNORE_INDEX (no loss).
    """
    B = len(examples)
    S = max(len(e.source) for e in examples)
    T = max(len(e.target) for e in examples) + 1
    src = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.bool)
    tgt_in = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        src[i, :len(e.source)] = torch.tensor(e.source)
        mask[i, :len(e.source)] = True
        n = len(e.target)
        tgt_in[i, :n + 1] = torch.tensor([bos_id, *e.target])
        targets[i, :n + 1] = torch.tensor([*e.target, eos_id])
    return src, targets, tgt_in, mask


def bucket(examples: list[Example], max_tokens: int, seed: int | None = None
           ) -> list[list[int]]:
    """Example indices grouped into batches of similar lengths whose padded size,
    rows * (longest source + longest target + 1), stays within max_tokens (an example
    longer than that alone makes a batch). seed shuffles equal lengths first (None: keep
    the input order among them)."""
    n = len(examples)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    lengths = [(len(examples[i].source), len(examples[i].target)) for i in order]
    order = [int(order[j]) for j in sorted(range(n), key=lambda j: lengths[j])]  # stable
    batches: list[list[int]] = []
    current: list[int] = []
    longest_src = longest_tgt = 0
    for i in order:
        s, t = len(examples[i].source), len(examples[i].target) + 1
        width = max(longest_src, s) + max(longest_tgt, t)
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_src, longest_tgt = [], 0, 0
        current.append(i)
        longest_src, longest_tgt = max(longest_src, s), max(longest_tgt, t)
    if current:
        batches.append(current)
    return batches


class TokenBatches:
    """Training batches of about max_tokens tokens, bucketed by length; each epoch visits
    every batch once in a new seeded order; the position is saved for exact resume.

    Under data parallelism (shard) rank r of N reads batches r, N + r, 2N + r, ... of each
    epoch's order: N ranks read, step by step, the batches one process reads with N times the
    accumulation (an epoch's last len % N batches are skipped); the state is every rank's.
    """

    def __init__(self, examples: list[Example], max_tokens: int, pad_id: int, bos_id: int,
                 eos_id: int, seed: int) -> None:
        if not examples:
            raise UserError("the training split is empty: give more pairs")
        self.examples, self.seed = examples, seed
        self.ids = (pad_id, bos_id, eos_id)
        self.batches = bucket(examples, max_tokens, seed)
        self.epoch, self.index = 0, 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read rank's share of every epoch (see the class docstring)."""
        if len(self.batches) < world_size:
            raise UserError(f"the training split makes {len(self.batches)} batches, fewer than "
                            f"{world_size} data-parallel ranks: lower seq2seq.max_tokens")
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank reads per epoch."""
        return len(self.batches) // self.world_size

    def next_batch(self) -> tuple[Tensor, ...]:
        """The next batch (source, targets, decoder inputs, source mask)."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.batches))
        batch = self.batches[int(order[self.index * self.world_size + self.rank])]
        self.index += 1
        return make_batch([self.examples[i] for i in batch], *self.ids)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "seq2seq", "epoch": self.epoch, "index": self.index, "seed": self.seed,
                "batches": len(self.batches), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "seq2seq" or state.get("seed") != self.seed \
                or state.get("batches") != len(self.batches):
            raise UserError("the checkpoint's data position belongs to another run: resume with "
                            "the same data, tokenizer and train.seed")
        # Batches read so far this epoch, counted on another number of ranks if need be.
        read = state["index"] * state.get("world_size", 1)
        self.epoch, self.index = state["epoch"], read // self.world_size


def iter_batches(examples: list[Example], max_tokens: int, pad_id: int, bos_id: int,
                 eos_id: int) -> Iterator[tuple[list[int], tuple[Tensor, ...]]]:
    """Every example once, in length buckets (evaluation): (indices, batch) pairs."""
    for batch in bucket(examples, max_tokens):
        yield batch, make_batch([examples[i] for i in batch], pad_id, bos_id, eos_id)
