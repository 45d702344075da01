"""The byte-level BPE tokenizer: train, encode, decode, save/load, GPT-2 files, HF export.

Encoding rule (tiktoken's, so the fast path can be tiktoken itself): split the text into
chunks with the pattern; a chunk that is itself a token becomes that token; otherwise start
from its single bytes and repeatedly merge the adjacent pair whose concatenation is the
lowest-ranked token (rank = id), leftmost first, until no adjacent pair forms a token.
`encode_reference` is that rule in plain Python; `encode` runs the same rule in tiktoken's
Rust core, built in memory from our vocabulary and pattern.
"""

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text
from scratchllm.tokenizer.base import (
    DEFAULT_SPECIALS,
    ENDOFTEXT,
    AllowedSpecial,
    BaseTokenizer,
    check_specials,
)
from scratchllm.tokenizer.bytelevel import bytes_to_str, str_to_bytes
from scratchllm.tokenizer.pretokenize import (
    DEFAULT_PATTERN,
    GPT2_PATTERN,
    compile_pattern,
    count_chunks,
    resolve_pattern,
)
from scratchllm.tokenizer.train import Pair, train_bpe


class Tokenizer(BaseTokenizer):
    """Byte-level BPE: ids 0..len(vocab)-1 are byte strings, special tokens come after."""

    kind = "bpe"

    def __init__(
        self,
        vocab: Sequence[bytes],
        merges: Sequence[Pair],
        special_tokens: dict[str, int] | None = None,
        pattern: str = DEFAULT_PATTERN,
    ):
        self.vocab = list(vocab)
        self.merges = [tuple(m) for m in merges]
        self.pattern = resolve_pattern(pattern)
        self.ranks = {token: i for i, token in enumerate(self.vocab)}
        check_vocab(self.vocab, self.merges, self.ranks)
        if special_tokens is None:
            special_tokens = {name: len(self.vocab) + i for i, name in enumerate(DEFAULT_SPECIALS)}
        check_specials(special_tokens, len(self.vocab))
        self.special_tokens = dict(special_tokens)
        self._cache: dict[str, list[int]] = {}

    # --- training -----------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = DEFAULT_PATTERN,
        special_tokens: Sequence[str] = (),
        workers: int | None = None,
        progress: bool = False,
    ) -> "Tokenizer":
        """Learn a BPE vocabulary of `vocab_size` ids (specials included) from texts.

        The specials are <|endoftext|>, <|pad|>, <|unk|> plus any in `special_tokens`
        (e.g. chat role markers); their ids come after the merged tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        specials = cls.check_vocab_size(vocab_size, special_tokens)
        counts = count_chunks(texts, pattern, workers=workers, progress=progress)
        if not counts:
            raise UserError("the training corpus is empty: give it some text")
        vocab, merges = train_bpe(counts, vocab_size - len(specials), progress=progress)
        specials_ids = {name: len(vocab) + i for i, name in enumerate(specials)}
        return cls(vocab, merges, specials_ids, pattern)

    @staticmethod
    def check_vocab_size(vocab_size: int, special_tokens: Sequence[str] = ()) -> list[str]:
        """Raise if vocab_size cannot hold 256 bytes + the specials; return the specials."""
        specials = list(dict.fromkeys([*DEFAULT_SPECIALS, *special_tokens]))
        if vocab_size < 256 + len(specials):
            raise UserError(f"vocab size {vocab_size} is too small: a byte-level tokenizer needs "
                            f"256 byte tokens + {len(specials)} special tokens = "
                            f"{256 + len(specials)} at least")
        return specials

    # --- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    @cached_property
    def fast(self):
        """A tiktoken.Encoding over our vocabulary and pattern (the fast path).

        Call its methods inside `tiktoken_errors()`: its Rust core can panic on some input.
        """
        import tiktoken

        try:
            return tiktoken.Encoding(
                name=f"scratchllm-{id(self)}",
                pat_str=self.pattern,
                mergeable_ranks=self.ranks,
                special_tokens=self.special_tokens,
            )
        except ValueError as e:  # the pattern is not a regex tiktoken's engine accepts
            detail = " ".join(str(e).split())
            raise UserError(f"tiktoken cannot use the tokenizer's pattern ({detail}); choose "
                            "another pattern") from None

    def encode_ordinary(self, text: str) -> list[int]:
        with tiktoken_errors():
            return self.fast.encode_ordinary(text)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special)
        with tiktoken_errors():
            return self.fast.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: Iterable[str], allowed_special: AllowedSpecial = (), num_threads: int = 8
    ) -> list[list[int]]:
        allowed = self._allowed(allowed_special)
        with tiktoken_errors():
            return self.fast.encode_batch(list(texts), num_threads=num_threads,
                                          allowed_special=allowed, disallowed_special=())

    def encode_array(self, text: str) -> np.ndarray:
        """encode_ordinary as a uint32 array, straight from tiktoken's buffer (no list)."""
        with tiktoken_errors():
            return self.fast.encode_to_numpy(text, disallowed_special=())

    def encode_reference(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """The readable pure-Python encoder; gives exactly the ids of `encode`."""
        return self._encode_with(self.encode_ordinary_reference, text, allowed_special)

    def encode_ordinary_reference(self, text: str) -> list[int]:
        """Pure-Python encoding of text with no special tokens (cached per chunk)."""
        ids: list[int] = []
        for chunk in compile_pattern(self.pattern).findall(text):
            cached = self._cache.get(chunk)
            if cached is None:
                cached = self._cache[chunk] = bpe_chunk(chunk.encode("utf-8"), self.ranks)
            ids.extend(cached)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        self._check_ids(ids)
        with tiktoken_errors():
            return self.fast.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token gives its UTF-8 name)."""
        return self.decode_bytes([token_id])

    # --- stats ----------------------------------------------------------------------------
    def stats(self, text: str | None = None, top: int = 10) -> dict[str, Any]:
        """Vocabulary summary, longest tokens, and bytes per token on `text` if given."""
        merged = [t for t in self.vocab if len(t) > 1]
        longest = sorted(range(len(self.vocab)), key=lambda i: (-len(self.vocab[i]), i))[:top]
        info: dict[str, Any] = {
            "type": self.kind,
            "vocab_size": self.vocab_size,
            "byte_tokens": len(self.vocab) - len(merged),
            "merged_tokens": len(merged),
            "special_tokens": dict(self.special_tokens),
            "mean_token_bytes": sum(map(len, self.vocab)) / len(self.vocab),
            "longest_tokens": [
                (i, self.vocab[i].decode("utf-8", errors="replace")) for i in longest
            ],
        }
        if text is not None:
            n_tokens = len(self.encode_ordinary(text))
            n_bytes = len(text.encode("utf-8"))
            info.update(text_bytes=n_bytes, text_tokens=n_tokens,
                        bytes_per_token=n_bytes / max(n_tokens, 1))
        return info

    # --- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            # Tokens as GPT-2's printable byte-level strings; the list index is the id/rank.
            "vocab": [bytes_to_str(t) for t in self.vocab],
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tokenizer":
        vocab = [str_to_bytes(s) for s in data["vocab"]]
        merges = [(int(a), int(b)) for a, b in data["merges"]]
        return cls(vocab, merges, {str(k): int(v) for k, v in data["special_tokens"].items()},
                   str(data["pattern"]))

    @classmethod
    def from_gpt2_files(
        cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike
    ) -> "Tokenizer":
        """Load OpenAI GPT-2's `encoder.json` + `vocab.bpe`; encodes exactly as tiktoken's gpt2."""
        for path in (encoder_json, vocab_bpe):
            if not Path(path).is_file():
                raise UserError(f"GPT-2 tokenizer file {path} does not exist")
        try:
            encoder: dict[str, int] = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
            lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
            specials = {s: encoder.pop(s) for s in [ENDOFTEXT] if s in encoder}
            vocab: list[bytes] = [b""] * len(encoder)
            for text, token_id in encoder.items():
                vocab[token_id] = str_to_bytes(text)
            merges = []
            for line in lines[1:]:  # line 0 is "#version: 0.2"
                if line.strip():
                    left, right = line.split()
                    merges.append((encoder[left], encoder[right]))
            if not all(vocab):
                raise ValueError("encoder.json ids have gaps")
        except (json.JSONDecodeError, AttributeError, TypeError, KeyError, IndexError,
                ValueError) as e:
            raise UserError(f"{encoder_json} / {vocab_bpe} are not GPT-2 tokenizer files "
                            f"({type(e).__name__}: {e})") from None
        return cls(vocab, merges, specials, GPT2_PATTERN)

    def export_hf(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face `tokenizer.json` that `tokenizers` encodes identically."""
        atomic_write_text(path, json.dumps(self.to_hf_dict(), ensure_ascii=False) + "\n")

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `tokenizers` JSON for this tokenizer (BPE model, byte-level pre-tokenizer)."""
        strings = [bytes_to_str(t) for t in self.vocab]
        added = [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pattern},
                     "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                     "use_regex": False},
                ],
            },
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": False},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                # A chunk that is a whole token is taken as is, as tiktoken does.
                "ignore_merges": True,
                "vocab": {s: i for i, s in enumerate(strings)},
                "merges": [[strings[a], strings[b]] for a, b in self.merges],
            },
        }


def check_vocab(vocab: Sequence[bytes], merges: Sequence[Pair], ranks: dict[bytes, int]) -> None:
    """Raise a one-line UserError unless vocab and merges form a BPE tiktoken can run.

    tiktoken's Rust core panics (a BaseException, not an error) when a byte of the text has no
    token, so all 256 single bytes must be tokens. Ranks are the list indices, so they are
    contiguous; they must also be unique. Every merge must join two tokens into a token, and
    every longer token must come from a merge of two tokens ranked before it: otherwise the
    rank order cannot be the merge order that encoding (and the HF export) relies on.
    """
    if len(ranks) != len(vocab):
        first: dict[bytes, int] = {}
        for rank, token in enumerate(vocab):
            if first.setdefault(token, rank) != rank:
                raise UserError(f"vocabulary has duplicate tokens: {first[token]} and {rank} "
                                f"are both {token!r}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        listed = ", ".join(f"0x{b:02x}" for b in missing[:8]) + (", ..." if len(missing) > 8
                                                                  else "")
        raise UserError(f"vocabulary lacks {len(missing)} of the 256 single-byte tokens "
                        f"({listed}); a byte-level BPE needs every byte")
    made: set[int] = set()
    n = len(vocab)
    for k, (a, b) in enumerate(merges):
        if not (0 <= a < n and 0 <= b < n):
            raise UserError(f"merge {k} ({a}, {b}) names an id outside the vocabulary (0..{n - 1})")
        rank = ranks.get(vocab[a] + vocab[b])
        if rank is None:
            raise UserError(f"merge {k} ({a}, {b}) makes no token in the vocabulary")
        if a < rank and b < rank:
            made.add(rank)
    for rank, token in enumerate(vocab):
        if len(token) > 1 and rank not in made:
            raise UserError(f"token {rank} ({token!r}) is not made by merging two tokens ranked "
                            "before it")


@contextmanager
def tiktoken_errors() -> Iterator[None]:
    """Turn a failure inside tiktoken's Rust core into a one-line UserError.

    A Rust panic reaches Python as pyo3's PanicException, a BaseException: no `except
    Exception` catches it and the user sees a Rust backtrace. Its regex engine panics (or,
    through some calls, raises ValueError) when it gives up on a text, e.g. a very long run of
    spaces, or a pattern that backtracks too much.
    """
    try:
        yield
    except ValueError as e:
        if "Regex error" not in str(e):
            raise
        raise UserError(_tiktoken_message(e)) from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise UserError(_tiktoken_message(e)) from None


def _tiktoken_message(error: BaseException) -> str:
    detail = " ".join(str(error).split())[:200]
    return (f"tiktoken failed to encode the text ({detail}); a very long run of one character "
            "(e.g. spaces) or a pattern that backtracks a lot does this: split the text or "
            "choose another pattern")


def bpe_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-tokenized chunk by the rule in the module docstring."""
    if chunk in ranks:
        return [ranks[chunk]]
    parts = [chunk[i : i + 1] for i in range(len(chunk))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def compression(tok: BaseTokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over texts (higher is better compression)."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tok.encode_ordinary(text))
    return n_bytes / max(n_tokens, 1)

