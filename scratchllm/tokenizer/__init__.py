"""Tokenizers: byte-level BPE (trained here, fast path through tiktoken) and character-level."""

from scratchllm.tokenizer.base import (
    DEFAULT_SPECIALS,
    ENDOFTEXT,
    PAD,
    UNK,
    BaseTokenizer,
)
from scratchllm.tokenizer.bpe import Tokenizer, compression
from scratchllm.tokenizer.char import CharTokenizer
from scratchllm.tokenizer.load import load_tokenizer
from scratchllm.tokenizer.pretokenize import DEFAULT_PATTERN, GPT2_PATTERN, GPT4_PATTERN, PATTERNS

__all__ = [
    "BaseTokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer", "compression",
    "DEFAULT_SPECIALS", "ENDOFTEXT", "PAD", "UNK",
    "DEFAULT_PATTERN", "GPT2_PATTERN", "GPT4_PATTERN", "PATTERNS",
]
