"""Building blocks: Linear, norms, MLPs and the position encodings' tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.model.config import GPTConfig
from scratchllm.model.fastpath import fast_linear

# ---- Linear --------------------------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that takes the CPU fast paths where they apply."""

    def forward(self, x: Tensor) -> Tensor:
        y = fast_linear(self, x)
        return F.linear(x, self.weight, self.bias) if y is None else y


# ---- dropout, norms and MLPs ---------------------------------------------------------------


def make_dropout(p: float) -> nn.Dropout | None:
    """nn.Dropout(p), or None for p == 0 so that callers skip a module call that does nothing."""
    # Dropout holds no parameters: leaving it out never changes state_dict() keys.
    return nn.Dropout(p) if p > 0 else None


def make_norm(cfg: GPTConfig) -> nn.Module:
    """The configured pre-norm: LayerNorm (GPT-2) or RMSNorm (LLaMA)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class GeluMLP(nn.Module):
    """GPT-2's MLP: up-project, GELU (tanh approximation, or exact for mlp="gelu_exact"),
    down-project."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up_proj = Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = make_dropout(cfg.resid_dropout)
        # torch's tanh is slow on CPUs: the erf form trains 5-6% faster (baby GPT, bf16)
        self.approximate = "tanh" if cfg.mlp == "gelu" else "none"

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))
        return y if self.dropout is None else self.dropout(y)


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = make_dropout(cfg.resid_dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if self.dropout is None else self.dropout(y)


def make_mlp(cfg: GPTConfig) -> nn.Module:
    """The configured MLP."""
    return SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)


# ---- position encodings --------------------------------------------------------------------


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """(n_pos, dim) fixed encoding of 'Attention Is All You Need': sin on even, cos on odd dims."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (n_pos, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    table = torch.empty(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


def rope_tables(n_pos: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (n_pos, head_dim), in the half-split layout HF LLaMA uses."""
    # Computed exactly as transformers does (fp32), so imported LLaMA weights match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(n_pos).float()[:, None] * inv_freq[None, :]  # (n_pos, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n_pos, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, head_dim) by angles given as cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_head: int) -> Tensor:
    """(n_head,) ALiBi slopes: a geometric sequence, interleaved when n_head isn't a power of 2."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = powers(closest)
    if closest < n_head:  # the paper's recipe: take every other slope of the next power of 2
        slopes += powers(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


# ---- additions for the encoder-decoder (model/seq2seq.py) ----------------------------------

ACTIVATIONS = {  # name -> function; the names transformers' configs use where they exist
    "relu": F.relu,  # the original Transformer
    "gelu": F.gelu,  # exact (erf) GELU, Marian's and BART's "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,  # = "swish", what OPUS-MT Marian models use
}


class ActMLP(nn.Module):
    """Up-project, a named activation (ACTIVATIONS), down-project: the paper's FFN."""

    def __init__(self, n_embd: int, hidden: int, activation: str, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.up_proj = Linear(n_embd, hidden, bias=bias)
        self.down_proj = Linear(hidden, n_embd, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = make_dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(self.act(self.up_proj(x)))
        return y if self.dropout is None else self.dropout(y)


def sinusoidal_table_split(n_pos: int, dim: int) -> Tensor:
    """(n_pos, dim) sinusoids with sin in the first half and cos in the second (fairseq and
    Marian), the same frequencies as sinusoidal_table's interleaved layout."""
    table = sinusoidal_table(n_pos, dim)
    return torch.cat([table[:, 0::2], table[:, 1::2]], dim=1)
