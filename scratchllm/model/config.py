"""GPTConfig: one typed dataclass that describes every decoder-only model we build."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, fields
from typing import Any

from scratchllm.errors import UserError

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_exact", "swiglu")
GELU_MLPS = ("gelu", "gelu_exact")  # GPT-2's MLP with either form of GELU
ATTENTIONS = ("sdpa", "explicit")


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _round_up(n: int, multiple: int) -> int:
    return multiple * ((n + multiple - 1) // multiple)


@dataclass
class GPTConfig:
    """Shape and flavour of a decoder-only transformer; presets via GPTConfig.preset(name)."""

    vocab_size: int = 4096
    context_length: int = 256  # longest sequence (rows of the position tables, cache size)
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: = n_head (multi-head); 1: multi-query; else grouped
    n_embd: int = 384
    mlp_hidden: int | None = None  # None: 4*n_embd (gelu*) or LLaMA's 8/3*n_embd rule (swiglu)
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2: yes, LLaMA: no)
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    pos_encoding: str = "learned"  # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm (always pre-norm)
    norm_eps: float = 1e-5
    # gelu: GELU's tanh approximation (GPT-2's weights expect it); gelu_exact: the erf form
    # (nanoGPT's nn.GELU), the same MLP 5-6% faster to train on a CPU; swiglu (LLaMA)
    mlp: str = "gelu"
    attention: str = "sdpa"  # sdpa (fast) | explicit (the teaching path); same result
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            # LLaMA keeps SwiGLU's parameter count near a 4x GELU MLP: 2/3 * 4d, rounded to 256.
            hidden = 4 * self.n_embd
            self.mlp_hidden = _round_up(2 * hidden // 3, 256) if self.mlp == "swiglu" else hidden
        self.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise UserError with a one-line fix for any inconsistent field."""
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"GPTConfig.{name} must be in [0, 1), got {value!r}")
        for name, value, choices in (("pos_encoding", self.pos_encoding, POS_ENCODINGS),
                                     ("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                     ("attention", self.attention, ATTENTIONS)):
            if value not in choices:
                hint = _suggest(str(value), choices)
                raise UserError(f"unknown GPTConfig.{name} {value!r}{hint}:"
                                f" choose one of {', '.join(choices)}")
        if self.n_embd % self.n_head:
            divisors = [h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}):"
                            f" choose n_head from {divisors} or change n_embd")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}):"
                            " use 1 (multi-query), a divisor of n_head (grouped-query) or n_head")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise UserError(f"rope needs an even head_dim, got {self.head_dim}:"
                            " change n_embd or n_head")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise UserError(f"sinusoidal encoding needs an even n_embd, got {self.n_embd}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise UserError("GPTConfig.norm_eps, rope_theta and init_std must be positive")

    # ---- presets and serialisation -------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named configuration (see PRESETS), with keyword overrides."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}{_suggest(name, list(PRESETS))}:"
                            f" choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a plain dict; unknown keys are an error that names the nearest field."""
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise UserError(f"unknown GPTConfig field {key!r}{_suggest(key, names)}:"
                                " remove it or fix its name")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """All fields as indented JSON."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


_GPT2 = dict(vocab_size=50257, context_length=1024)
_LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
              tie_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized GPT-2-style models for the demo and tests (vocab = our tokenizer's default).
    "nano": dict(vocab_size=4096, context_length=128, n_layer=4, n_head=4, n_embd=128),
    "micro": dict(vocab_size=4096, context_length=256, n_layer=6, n_head=6, n_embd=192),
    "baby": dict(vocab_size=4096, context_length=256, n_layer=6, n_head=6, n_embd=384),  # nanoGPT
    # CPU-sized LLaMA-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention.
    "llama-tiny": dict(vocab_size=4096, context_length=256, n_layer=4, n_head=8, n_kv_head=2,
                       n_embd=256, mlp_hidden=768, norm_eps=1e-6, **_LLAMA),
    # Published models (parameter counts checked in tests).
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, **_GPT2),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **_GPT2),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **_GPT2),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **_GPT2),  # 1.5B
    "tinyllama-1.1b": dict(vocab_size=32000, context_length=2048, n_layer=22, n_head=32,
                           n_kv_head=4, n_embd=2048, mlp_hidden=5632, **_LLAMA),
}
