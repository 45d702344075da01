"""Generated ids to text, one token at a time: whole UTF-8 characters only, stop strings cut out."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from scratchllm.tokenizer import BaseTokenizer


class TextStream:
    """Decode tokens incrementally; `push` returns the text that is now safe to show.

    Safe means: complete UTF-8 characters (a token may end inside a multi-byte character) that
    cannot be the start of a stop string. Text that might begin a stop string is held back until
    the next tokens settle it; once a stop string appears, everything from it on is dropped.
    """

    def __init__(self, tokenizer: BaseTokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far, stop string included
        self.emitted = 0  # characters of self.text already returned
        self.ends: list[int] = []  # len(self.text) after each token
        self.stop_at: int | None = None  # where the first stop string begins

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared."""
        return self.stop_at is not None

    def push(self, token_id: int) -> str:
        """Add one token; return the newly safe text ('' while a character or stop is pending)."""
        old = len(self.text)
        self.text += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        self.ends.append(len(self.text))
        if self.stops:
            # Earlier text held no stop string, so a new one ends in the new piece.
            hits = [i for s in self.stops
                    if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
            if hits:
                self.stop_at = min(hits)
                return self._emit(self.stop_at)
        return self._emit(len(self.text) - self._pending_stop_prefix())

    def flush(self) -> str:
        """The rest of the text at the end of generation (a dangling byte becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def final_text(self) -> str:
        """All generated text, cut before the first stop string."""
        return self.text if self.stop_at is None else self.text[:self.stop_at]

    def kept_tokens(self) -> int:
        """How many tokens end before the stop string (all of them when none appeared)."""
        if self.stop_at is None:
            return len(self.ends)
        return sum(1 for end in self.ends if end <= self.stop_at)

    def _pending_stop_prefix(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
