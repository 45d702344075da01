"""Sampling strategies: each one a small function on logits, composed by `sample_next`.

Order (the same as Hugging Face and vLLM): penalties, then temperature, then the filters
top-k, top-p and min-p (each on what the previous one kept), then a draw, or argmax when the
temperature is 0. A filter removes a token by setting its logit to -inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scratchllm.errors import UserError


@dataclass
class SamplingConfig:
    """How to pick the next token from the model's logits; temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens (ties with the k-th are kept too)
    top_p: float | None = None  # keep the smallest set whose probability reaches p (nucleus)
    min_p: float | None = None  # keep tokens with probability >= min_p * the top probability
    repetition_penalty: float = 1.0  # CTRL's: divide (or multiply) logits of seen tokens
    frequency_penalty: float = 0.0  # OpenAI's: minus this times a token's count so far
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has been generated

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the option that is out of range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 1):
            raise UserError(f"top_k must be a positive integer (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got "
                            f"{self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number (0 = off)")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """True when any penalty changes the logits (they then need the token history)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


def is_int(value: object) -> bool:
    """True for a real int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ---- the history the penalties read -----------------------------------------------------------


class History:
    """Which tokens each row has seen: prompt or generated (`seen`), and generated counts."""

    def __init__(self, prompts: list[list[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        B = len(prompts)
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)  # (B, V)
        self.counts = torch.zeros(B, vocab_size, device=device)  # (B, V) generated only
        for row, ids in enumerate(prompts):
            self.seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True

    def add(self, tokens: Tensor) -> None:
        """Record one new token per row, tokens (B,)."""
        self.seen.scatter_(1, tokens[:, None], True)
        self.counts.scatter_add_(1, tokens[:, None], self.counts.new_ones(tokens.shape[0], 1))

    def reorder(self, rows: Tensor) -> None:
        """Keep rows in the given order (beam search picks its surviving beams)."""
        self.seen, self.counts = self.seen[rows], self.counts[rows]


# ---- one function per strategy ----------------------------------------------------------------


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on seen tokens: positive logits / penalty, negative ones * penalty."""
    # Dividing a negative logit would raise it, so those are multiplied instead.
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def frequency_presence_penalty(logits: Tensor, counts: Tensor, frequency: float,
                               presence: float) -> Tensor:
    """OpenAI's penalties: minus frequency * count, minus presence once the count is > 0."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (and any tied with the k-th); -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest most-likely set whose probability reaches p; -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= p  # the set had already reached p: never drops the top token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is >= min_p times the most likely token's; -inf elsewhere."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(logits: Tensor, cfg: SamplingConfig, history: History | None) -> Tensor:
    """The repetition, frequency and presence penalties of cfg (a no-op when all are off)."""
    if not cfg.has_penalties:
        return logits
    if history is None:
        raise ValueError("penalties need the token history: pass a History")
    if cfg.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, history.seen, cfg.repetition_penalty)
    if cfg.frequency_penalty or cfg.presence_penalty:
        logits = frequency_presence_penalty(logits, history.counts, cfg.frequency_penalty,
                                            cfg.presence_penalty)
    return logits


def process_logits(logits: Tensor, cfg: SamplingConfig, history: History | None = None
                   ) -> Tensor:
    """Apply penalties, temperature and filters to logits (B, V); returns float32 logits."""
    logits = apply_penalties(logits.float(), cfg, history)
    if cfg.greedy:  # filters never remove the argmax, so greedy can skip them
        return logits
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def sample_next(logits: Tensor, history: History | None, cfg: SamplingConfig,
                generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """The next token (B,) for logits (B, V): argmax at temperature 0, else a draw.

    generator: one for the batch, or a list of B (each row draws its uniform number from its
    own: a row draws what it would alone, in any batch).
    """
    logits = process_logits(logits, cfg, history)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    # With a generator the draw never touches torch's global RNG (training stays reproducible).
    if isinstance(generator, list):
        uniforms = torch.cat([torch.rand(1, 1, generator=g, device=probs.device)
                              for g in generator])
    else:
        uniforms = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    return inverse_cdf(probs, uniforms)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """One token per row of probs (n, V) from one uniform number u per row (uniforms (n, 1)):
    the first token whose cumulative probability exceeds u times the row's total.

    A draw from the distribution, as torch.multinomial's, at the cost of one random number per
    row (multinomial draws one per vocabulary entry: most of a small model's sampling time).
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # Below the total even after rounding, so a token of probability 0 is never chosen.
    below = torch.nextafter(total, torch.zeros_like(total))
    u = torch.minimum(uniforms.to(total.dtype) * total, below)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)
