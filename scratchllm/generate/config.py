"""GenerationConfig (sampling plus the engine's options) and Completion (one row's result)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scratchllm.errors import UserError
from scratchllm.generate.sampling import SamplingConfig, is_int

CONTEXT_POLICIES = ("slide", "stop")


@dataclass
class GenerationConfig(SamplingConfig):
    """Everything `generate` accepts besides the model and the prompt."""

    max_new_tokens: int = 100
    num_beams: int = 1  # > 1: beam search (deterministic; penalties apply, sampling options not)
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    early_stopping: bool = False  # beams: stop at num_beams finished (True) or when none can win
    stop_ids: tuple[int, ...] = ()  # token ids that end a sequence (not returned)
    stop_strings: tuple[str, ...] = ()  # texts that end a sequence (not returned; need tokenizer)
    seed: int | None = None  # own torch.Generator: the global RNG is never touched
    truncate_prompt: bool = False  # a prompt over context_length keeps its last tokens
    context_policy: str = "slide"  # past context_length: slide the window, or stop
    slide_tokens: int | None = None  # tokens dropped per slide (None: context_length // 4)
    use_cache: bool = True  # False: recompute the whole window each step (the slow reference)

    def validate(self) -> None:
        """Raise UserError naming the option that is out of range."""
        super().validate()
        if not (is_int(self.max_new_tokens) and self.max_new_tokens >= 0):
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (is_int(self.num_beams) and self.num_beams >= 1):
            raise UserError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and any(v is not None for v in (self.top_k, self.top_p,
                                                              self.min_p)):
            raise UserError("beam search is deterministic: drop top_k / top_p / min_p, "
                            "or use num_beams=1 to sample")
        if self.context_policy not in CONTEXT_POLICIES:
            raise UserError(f"context_policy must be one of {', '.join(CONTEXT_POLICIES)}, "
                            f"got {self.context_policy!r}")
        if self.slide_tokens is not None and not (is_int(self.slide_tokens)
                                                  and self.slide_tokens >= 1):
            raise UserError(f"slide_tokens must be >= 1, got {self.slide_tokens}")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if isinstance(self.stop_strings, str):  # a lone string is one stop, not its characters
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class Completion:
    """One generated sequence: the new ids, their text and why generation ended."""

    prompt_ids: list[int]  # as fed to the model (after any truncation)
    ids: list[int] = field(default_factory=list)  # new tokens, stop token / stop text excluded
    text: str | None = None  # decoded new text (when a tokenizer was given)
    finish_reason: str = "length"  # length (max_new_tokens) | stop | context (window full)
    score: float | None = None  # beam search: the length-penalised log-probability
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding, after the first token."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (len(self.ids) - 1) / decode_s if len(self.ids) > 1 and decode_s > 0 else 0.0
