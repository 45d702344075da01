"""Building blocks: Linear, norms, MLPs and the position encodings' tables."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.model.config import GPTConfig

# ---- Linear --------------------------------------------------------------------------------


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 matmuls on this CPU (AVX512-BF16 or AMX)."""
    if os.environ.get("SCRATCHLLM_NATIVE_BF16") == "1":  # force torch's own bf16 kernels
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def slow_bf16_cpu(x: Tensor) -> bool:
    """True when x is (or autocasts to) bf16 on a CPU without native bf16 matmuls."""
    # Called by every Linear: the common fp32 answer costs two attribute reads and one query
    # (x.device would build a torch.device object each time).
    if not x.is_cpu:
        return False
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return bf16 and not _cpu_has_fast_bf16()


def bf16_exact(t: Tensor) -> Tensor:
    """Round to bf16 and hold the result in fp32 (exactly representable)."""
    return t.to(torch.bfloat16).float()


class _Bf16LinearViaFp32(torch.autograd.Function):
    """A bf16 linear layer (bf16 inputs, fp32 accumulation, bf16 output) run on fp32 GEMMs.

    Without AVX512-BF16/AMX, torch's bf16 GEMM is a reference loop 10-20x slower than fp32 MKL.
    A product of two bf16 numbers is exact in fp32, so fp32 GEMMs on bf16-rounded operands give
    what a native bf16 GEMM gives (up to summation order); activations are saved in bf16, as
    under autocast. Gradients are left unrounded (fp32): at least as precise as autocast's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)  # what autocast would keep: bf16 input and weight copies
        ctx.has_bias = b is not None
        bias = bf16_exact(b) if b is not None else None
        return F.linear(xb.float(), wb.float(), bias).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xb, wb = ctx.saved_tensors
        g2 = g.reshape(-1, wb.shape[0]).float()  # (M, N); g is bf16: the output was bf16
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ wb.float()).view(xb.shape)  # (..., K)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ xb.reshape(-1, xb.shape[-1]).float()  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb  # autograd casts each to its input's dtype


def one_row(x: Tensor) -> bool:
    """True for a single row (batch-1 decode step) on the CPU without autograd."""
    return x.is_cpu and x.numel() == x.shape[-1] and not torch.is_grad_enabled()


def derived_tensor(owner: nn.Module, name: str, sources: tuple[Tensor, ...],
                   build: Callable[[], Tensor]) -> Tensor | None:
    """build() cached on `owner` until one of `sources` changes; None for inference tensors.

    Keyed on each source's identity, storage, in-place version and dtype, so a result is never
    stale (an optimizer step, load_state_dict, `.to(dtype)` or a new Parameter rebuild it).
    Kept in a plain attribute: never in state_dict(). Inference tensors have no version
    counter: None.
    """
    if any(t.is_inference() for t in sources):
        return None
    key = tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in sources)
    cached = owner.__dict__.get(name)  # (key, tensor)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


def transposed_product(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ weight_t (in, out) + bias for a single row x."""
    x2 = x.reshape(1, -1)  # (1, in)
    y = x2 @ weight_t if bias is None else torch.addmm(bias, x2, weight_t)
    return y.view(*x.shape[:-1], -1)  # (..., out)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) with fast CPU paths: bf16 without AMX, and
    one-row (batch-1 decode) products of wide layers."""

    def forward(self, x: Tensor) -> Tensor:
        if slow_bf16_cpu(x):
            with torch.autocast("cpu", enabled=False):
                return _Bf16LinearViaFp32.apply(x, self.weight, self.bias)
        if self.out_features >= self.in_features and one_row(x):
            # A one-row product streams the whole weight from memory, and MKL's GEMV streams
            # an (in, out) matrix (axpy on long rows) about twice as fast as our (out, in) one
            # (dot products of short rows) when out >= in: the up-projection and lm_head of a
            # batch-1 decode step. The (in, out) copy is made on first use.
            w = self.weight
            weight_t = derived_tensor(self, "_weight_t", (w,), lambda: w.detach().t().contiguous())
            if weight_t is not None:
                return transposed_product(x, weight_t, self.bias)
        return F.linear(x, self.weight, self.bias)


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
    """GPT-2's MLP: up-project, GELU (tanh approximation), down-project."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up_proj = Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = make_dropout(cfg.resid_dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
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
