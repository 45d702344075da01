"""Cleaning text before tokenization: line endings, Gutenberg boilerplate, duplicates."""

import hashlib
import re

_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*?\*\*\*[^\n]*\n",
                       re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.IGNORECASE |
                     re.MULTILINE)


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR become LF."""
    if "\r" not in text:
        return text
    text = text.replace("\r\n", "\n")
    # Lone CRs are rare: checking for one is cheaper than a second copying pass.
    return text.replace("\r", "\n") if "\r" in text else text


def strip_gutenberg(text: str) -> str:
    """Keep only the text between Project Gutenberg's START and END markers (if present)."""
    text, _ = gutenberg_cut(text)
    return text.strip() + "\n"


def gutenberg_cut(text: str, find_start: bool = True) -> tuple[str, bool]:
    """Cut the header before START and the footer from END on; say whether END was found."""
    if "***" not in text:  # a fast test that spares most segments the regex search
        return text, False
    start = _PG_START.search(text) if find_start else None
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        return text[: end.start()], True
    return text, False


def is_gutenberg(text: str) -> bool:
    """True when the text carries Project Gutenberg's START marker."""
    return _PG_START.search(text[:100_000]) is not None


class Deduplicator:
    """Drops exact duplicate documents by their hash (memory: 16 bytes per document)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.dropped = 0

    @staticmethod
    def hasher() -> "hashlib._Hash":
        """A fresh hash to feed a document's text to, piece by piece (see utf8)."""
        return hashlib.blake2b(digest_size=16)

    def is_new(self, text: str) -> bool:
        """True the first time a text is seen."""
        digest = self.hasher()
        digest.update(utf8(text))
        return self.is_new_digest(digest.digest())

    def is_new_digest(self, digest: bytes) -> bool:
        """True the first time a document's digest (from `hasher`) is seen."""
        if digest in self.seen:
            self.dropped += 1
            return False
        self.seen.add(digest)
        return True


def utf8(text: str) -> bytes:
    """text as UTF-8, lone surrogates (possible in JSON records) included."""
    return text.encode("utf-8", errors="surrogatepass")
