"""What every tokenizer shares: special tokens, batch encoding, range-checked decoding, files."""

import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import regex

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text

FORMAT_NAME = "scratchllm-tokenizer"
FORMAT_VERSION = 1

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
DEFAULT_SPECIALS = (ENDOFTEXT, PAD, UNK)

if TYPE_CHECKING:
    import numpy as np

AllowedSpecial = Literal["all"] | Collection[str]


class BaseTokenizer:
    """Special-token handling and I/O shared by the BPE and character tokenizers.

    Special-token rule (the same as tiktoken's): by default, text such as "<|endoftext|>"
    inside the input is ordinary text and is encoded like any other characters. Pass
    `allowed_special="all"` (or a set of names) to turn those strings into their single ids.
    """

    kind: str = ""
    special_tokens: dict[str, int]

    # --- what subclasses provide -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0 .. vocab_size - 1)."""
        raise NotImplementedError

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with every special-token string treated as plain text."""
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of a sequence of ids (range-checked)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of the tokenizer file (without the format header)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseTokenizer":
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Encode text to ids; special-token strings count only if in `allowed_special`."""
        return self._encode_with(self.encode_ordinary, text, allowed_special)

    def _encode_with(
        self, encode_ordinary: Callable[[str], list[int]], text: str,
        allowed_special: AllowedSpecial,
    ) -> list[int]:
        # Cut the text at allowed special-token strings; encode the rest as ordinary text.
        allowed = self._allowed(allowed_special)
        if not allowed:
            return encode_ordinary(text)
        ids: list[int] = []
        for part in _special_splitter(frozenset(allowed)).split(text):
            if part in allowed:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(encode_ordinary(part))
        return ids

    def encode_batch(
        self, texts: Iterable[str], allowed_special: AllowedSpecial = (), num_threads: int = 1
    ) -> list[list[int]]:
        """Encode many texts (the BPE tokenizer does it on `num_threads` threads)."""
        return [self.encode(text, allowed_special) for text in texts]

    def encode_array(self, text: str) -> "np.ndarray":
        """encode_ordinary as a uint32 numpy array."""
        import numpy as np

        return np.asarray(self.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as soon as it forms complete UTF-8 characters."""
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token_id in ids:
            piece = decoder.decode(self.decode_bytes([token_id]))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def special_id(self, name: str) -> int:
        """The id of a special token, e.g. special_id('<|endoftext|>')."""
        if name not in self.special_tokens:
            known = ", ".join(self.special_tokens) or "none"
            raise UserError(f"tokenizer has no special token {name!r} (it has: {known})")
        return self.special_tokens[name]

    @property
    def eot_id(self) -> int:
        """The id of <|endoftext|>, the document separator."""
        return self.special_id(ENDOFTEXT)

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise UserError(f"unknown special tokens in allowed_special: {sorted(unknown)}")
        return set(allowed_special)

    def _check_ids(self, ids: list[int]) -> None:
        n = self.vocab_size
        for token_id in ids:
            if not 0 <= token_id < n:
                raise UserError(
                    f"token id {token_id} is out of range for a vocabulary of {n} ids (0..{n - 1})"
                )

    def fingerprint(self) -> str:
        """A sha256 of the tokenizer's content: equal fingerprints encode identically."""
        import hashlib

        content = json.dumps({"type": self.kind, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    # --- files --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as versioned, human-readable JSON (atomically)."""
        data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "type": self.kind}
        data.update(self.to_dict())
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BaseTokenizer":
        """Load a tokenizer saved by `save`; the file must hold this class's type."""
        if cls is BaseTokenizer:
            # Only load.py knows every subclass; importing it here would be an import cycle.
            raise TypeError("BaseTokenizer.load cannot tell which class to build; use "
                            "scratchllm.tokenizer.load_tokenizer for a file of any type")
        data = read_tokenizer_file(path)
        if data.get("type") != cls.kind:
            raise UserError(f"{path} holds a {data.get('type')!r} tokenizer, not {cls.kind!r}")
        return build_tokenizer(path, data, {cls.kind: cls})


def _special_splitter(names: frozenset[str]) -> regex.Pattern:
    # Longest names first, so "<|a|><|ab|>"-style overlaps pick the longer token.
    alternatives = "|".join(regex.escape(n) for n in sorted(names, key=len, reverse=True))
    return regex.compile(f"({alternatives})")


def read_tokenizer_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the header of a tokenizer file; raise UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; train one with "
                        "`scratchllm tokenizer train`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a valid tokenizer file (not JSON: {e}); "
                        "re-create it with `scratchllm tokenizer train`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a scratchllm tokenizer file (no '\"format\": "
                        f"\"{FORMAT_NAME}\"' header); HF tokenizer.json files are export-only")
    if data.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} is tokenizer format version {data.get('version')!r}, but this "
                        f"scratchllm reads version {FORMAT_VERSION}; upgrade scratchllm or "
                        "re-train the tokenizer")
    return data


def build_tokenizer(
    path: str | os.PathLike, data: dict[str, Any], types: Mapping[str, type[BaseTokenizer]]
) -> BaseTokenizer:
    """Build the tokenizer a file's `data` holds, with the class `types` maps its type to."""
    if data.get("type") not in types:
        raise UserError(f"{path} has unknown tokenizer type {data.get('type')!r} "
                        f"(expected one of {sorted(types)})")
    try:
        return types[data["type"]].from_dict(data)
    except UserError as e:
        raise UserError(f"{path} is corrupt: {e}; re-create it with `scratchllm tokenizer "
                        "train`") from None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}); re-create it with "
                        "`scratchllm tokenizer train`") from None


def check_specials(specials: dict[str, int], first_id: int) -> None:
    """Special ids must follow the ordinary tokens with no gaps: first_id, first_id + 1, ..."""
    if sorted(specials.values()) != list(range(first_id, first_id + len(specials))):
        raise UserError(f"special token ids must be {first_id}..{first_id + len(specials) - 1} "
                        f"with no gaps, got {specials}")
