"""The public entry points: generate ids, generate a batch, complete with details, stream text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from scratchllm.generate.beam import beam_search
from scratchllm.generate.config import Completion, GenerationConfig
from scratchllm.generate.engine import fit_prompt, sample_stream
from scratchllm.tokenizer import BaseTokenizer


def complete(model: nn.Module, prompts: list[list[int]], config: GenerationConfig,
             tokenizer: BaseTokenizer | None = None) -> list[Completion]:
    """One Completion per prompt (ids, text with a tokenizer, finish reason, timings)."""
    if config.num_beams > 1:
        return [beam_search(model, prompt, config, tokenizer) for prompt in prompts]
    out: list[Completion] = []
    for _ in sample_stream(model, prompts, config, tokenizer, out):
        pass
    return out


def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int = 100, *,
             tokenizer: BaseTokenizer | None = None, **options: Any) -> list[int]:
    """The new token ids after prompt_ids; options are GenerationConfig fields."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, **options)
    return complete(model, [list(prompt_ids)], config, tokenizer)[0].ids


def generate_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int = 100, *,
                   tokenizer: BaseTokenizer | None = None, **options: Any) -> list[list[int]]:
    """generate for many prompts at once (left-padded batch; each row stops on its own)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, **options)
    return [c.ids for c in complete(model, [list(p) for p in prompts], config, tokenizer)]


def stream(model: nn.Module, tokenizer: BaseTokenizer, prompt: str | list[int],
           max_new_tokens: int = 100, *, config: GenerationConfig | None = None,
           out: list[Completion] | None = None, **options: Any) -> Iterator[str]:
    """Yield the generated text piece by piece, whole UTF-8 characters only.

    A str prompt is encoded with special tokens allowed. Pass options as GenerationConfig
    fields, or a whole `config`. `out`, if given, receives the Completion. Beam search cannot
    know its winner early, so it yields its text at the end.
    """
    if config is None:
        config = GenerationConfig(max_new_tokens=max_new_tokens, **options)
    elif options:
        raise TypeError("pass either config or options, not both")
    ids = tokenizer.encode(prompt, allowed_special="all") if isinstance(prompt, str) \
        else list(prompt)
    fit_prompt(ids, model, config.truncate_prompt)  # raise bad input now, not at first next()
    return _stream(model, tokenizer, ids, config, [] if out is None else out)


def _stream(model: nn.Module, tokenizer: BaseTokenizer, ids: list[int],
            config: GenerationConfig, out: list[Completion]) -> Iterator[str]:
    if config.num_beams > 1:
        result = beam_search(model, ids, config, tokenizer)
        out.append(result)
        if result.text:
            yield result.text
        return
    for deltas in sample_stream(model, [ids], config, tokenizer, out):
        if deltas[0]:
            yield deltas[0]
