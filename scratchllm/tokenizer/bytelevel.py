"""GPT-2's printable stand-ins for raw bytes, so byte tokens can live in JSON and HF files.

Printable ASCII and Latin-1 bytes map to themselves; the rest (space, control bytes, ...)
map to code points from U+0100 on. This is the mapping of GPT-2's `encoder.json`/`vocab.bpe`
and of HF's ByteLevel pre-tokenizer.
"""

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """Map each byte 0-255 to its printable stand-in character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    """The inverse of byte_to_char."""
    return {c: b for b, c in byte_to_char().items()}


def bytes_to_str(token: bytes) -> str:
    """A token's bytes as printable byte-level characters (e.g. b' the' -> 'Ġthe')."""
    table = byte_to_char()
    return "".join(table[b] for b in token)


def str_to_bytes(text: str) -> bytes:
    """Inverse of bytes_to_str; raises KeyError on a character that stands for no byte."""
    table = char_to_byte()
    return bytes(table[c] for c in text)
