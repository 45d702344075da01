"""A character-level tokenizer with the BPE tokenizer's interface (for char-level models)."""

from collections.abc import Iterable, Sequence
from typing import Any

from scratchllm.errors import UserError
from scratchllm.tokenizer.base import DEFAULT_SPECIALS, UNK, BaseTokenizer, check_specials


class CharTokenizer(BaseTokenizer):
    """One id per distinct character seen in training; unseen characters become <|unk|>."""

    kind = "char"

    def __init__(self, chars: Sequence[str], special_tokens: dict[str, int] | None = None):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        if len(self.index) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise UserError("character vocabulary must hold distinct single characters")
        if special_tokens is None:
            special_tokens = {name: len(self.chars) + i for i, name in enumerate(DEFAULT_SPECIALS)}
        check_specials(special_tokens, len(self.chars))
        if UNK not in special_tokens:
            raise UserError(f"a character tokenizer needs the {UNK} special token")
        self.special_tokens = dict(special_tokens)
        self.unk_id = special_tokens[UNK]
        self._texts = self.chars + sorted(special_tokens, key=special_tokens.get)

    @classmethod
    def train(cls, texts: Iterable[str], special_tokens: Sequence[str] = ()) -> "CharTokenizer":
        """Collect the distinct characters of texts (sorted by code point)."""
        if isinstance(texts, str):
            texts = [texts]
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise UserError("the training corpus is empty: give it some text")
        specials = list(dict.fromkeys([*DEFAULT_SPECIALS, *special_tokens]))
        ordered = sorted(chars)
        return cls(ordered, {name: len(ordered) + i for i, name in enumerate(specials)})

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        get, unk = self.index.get, self.unk_id
        return [get(c, unk) for c in text]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        self._check_ids(ids)
        return "".join(self._texts[i] for i in ids).encode("utf-8")

    def stats(self, text: str | None = None, top: int = 10) -> dict[str, Any]:
        """Vocabulary summary, and bytes per token on `text` if given."""
        info: dict[str, Any] = {"type": self.kind, "vocab_size": self.vocab_size,
                                "characters": len(self.chars),
                                "special_tokens": dict(self.special_tokens)}
        if text is not None:
            ids = self.encode_ordinary(text)
            info.update(text_bytes=len(text.encode("utf-8")), text_tokens=len(ids),
                        bytes_per_token=len(text.encode("utf-8")) / max(len(ids), 1),
                        unknown_chars=ids.count(self.unk_id))
        return info

    def to_dict(self) -> dict[str, Any]:
        return {"chars": self.chars, "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CharTokenizer":
        return cls([str(c) for c in data["chars"]],
                   {str(k): int(v) for k, v in data["special_tokens"].items()})
