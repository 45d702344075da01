"""Load a tokenizer file of any type: the one module that knows every tokenizer class.

It sits above base.py, bpe.py and char.py (they never import it), so loading by type needs no
import cycle.
"""

import os

from scratchllm.tokenizer.base import BaseTokenizer, build_tokenizer, read_tokenizer_file
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.char import CharTokenizer

# The "type" field of a tokenizer file -> the class that reads it.
TOKENIZER_TYPES: dict[str, type[BaseTokenizer]] = {
    Tokenizer.kind: Tokenizer,
    CharTokenizer.kind: CharTokenizer,
}


def load_tokenizer(path: str | os.PathLike) -> BaseTokenizer:
    """Load any scratchllm tokenizer file (BPE or character-level)."""
    return build_tokenizer(path, read_tokenizer_file(path), TOKENIZER_TYPES)
