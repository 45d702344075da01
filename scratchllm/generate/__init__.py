"""Text generation: sampling strategies, a KV-cache engine, beam search and streaming."""

import importlib

# Names are imported on first use (PEP 562), so that `scratchllm --help` or `scratchllm
# prepare` (whose parser includes the generate command's) do not pay torch's ~3 s import.
_EXPORTS = {
    "api": ["generate", "generate_batch", "complete", "stream"],
    "beam": ["beam_search"],
    "config": ["GenerationConfig", "Completion"],
    "sampling": ["SamplingConfig", "History", "sample_next", "process_logits",
                 "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter",
                 "repetition_penalty", "frequency_presence_penalty"],
    "text": ["TextStream"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
