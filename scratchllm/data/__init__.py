"""Corpora: sources, named datasets, cleaning, token shards and loaders."""

from scratchllm.data.shakespeare import shakespeare_plays, shakespeare_text
from scratchllm.data.sources import SourceOptions, iter_segments, read_text_file, texts_from_source

__all__ = ["shakespeare_plays", "shakespeare_text", "read_text_file", "texts_from_source",
           "iter_segments", "SourceOptions"]
