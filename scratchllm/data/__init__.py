"""Corpora and the texts they hold."""

from scratchllm.data.shakespeare import shakespeare_plays, shakespeare_text
from scratchllm.data.sources import read_text_file, texts_from_source

__all__ = ["shakespeare_plays", "shakespeare_text", "read_text_file", "texts_from_source"]
