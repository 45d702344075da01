"""Text generation: sampling strategies, a KV-cache engine, beam search and streaming."""

from scratchllm.generate.api import complete, generate, generate_batch, stream
from scratchllm.generate.beam import beam_search
from scratchllm.generate.config import Completion, GenerationConfig
from scratchllm.generate.sampling import (
    History,
    SamplingConfig,
    apply_temperature,
    frequency_presence_penalty,
    min_p_filter,
    process_logits,
    repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from scratchllm.generate.text import TextStream

__all__ = [
    "generate", "generate_batch", "complete", "stream", "beam_search", "GenerationConfig",
    "Completion", "SamplingConfig", "History", "sample_next", "process_logits",
    "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "repetition_penalty",
    "frequency_presence_penalty", "TextStream",
]
