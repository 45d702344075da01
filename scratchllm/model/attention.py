"""Causal self-attention: the kernel (two interchangeable paths) and the module around it."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.model.cache import KVCache
from scratchllm.model.config import GPTConfig
from scratchllm.model.layers import (
    Linear,
    apply_rope,
    bf16_exact,
    derived_tensor,
    make_dropout,
    one_row,
    slow_bf16_cpu,
    transposed_product,
)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                       dropout_p: float = 0.0) -> Tensor:
    """The teaching path: scores, an additive -inf mask, softmax, then weights times values."""
    # q (B, H, T, hd); k, v (B, H_kv, S, hd); mask (B|1, H|1, T, S) additive, None = causal T == S
    if k.shape[1] != q.shape[1]:  # grouped-query: each kv head serves n_head/n_kv_head heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:  # position i may look at j <= i: -inf above the diagonal
        T, S = scores.shape[-2:]
        mask = torch.full((T, S), float("-inf"), device=q.device).triu(S - T + 1)
    weights = torch.softmax(scores.float() + mask, dim=-1).to(q.dtype)  # rows sum to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v  # (B, H, T, hd)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                   dropout_p: float = 0.0) -> Tensor:
    """The fast path: torch's fused scaled_dot_product_attention, same inputs and result."""
    gqa = k.shape[1] != q.shape[1]
    if slow_bf16_cpu(q):  # torch's bf16 kernel is slow there; fp32 on bf16 values is as exact
        with torch.autocast("cpu", enabled=False):
            q, k, v = bf16_exact(q), bf16_exact(k), bf16_exact(v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=mask is None, enable_gqa=gqa)
        return y.to(torch.bfloat16)
    if mask is not None:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None, enable_gqa=gqa)


class AttnInputs(NamedTuple):
    """What every layer's attention needs besides x; built once per forward by the model."""

    rope: tuple[Tensor, Tensor] | None  # cos, sin, each (B|1, 1, T, head_dim)
    mask: Tensor | None  # additive float (B|1, H|1, T, S); None = plain causal with S == T
    input_pos: Tensor | None  # (T,) cache slots written by this call; None without a cache


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query or multi-query attention with separate q/k/v projections."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = make_dropout(cfg.resid_dropout)
        self.kernel = explicit_attention if cfg.attention == "explicit" else sdpa_attention

    def forward(self, x: Tensor, inputs: AttnInputs, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self._project_qkv(x)
        # Heads are inferred (-1) so tensor parallelism can shard the projections unchanged.
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(inputs.input_pos, k, v)  # (B, H_kv, max_seq, hd)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = self.kernel(q, k, v, inputs.mask, dropout_p)  # (B, H, T, hd)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C) from (B, T, H * hd)
        return y if self.resid_dropout is None else self.resid_dropout(y)

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, T, features) of x (B, T, C)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if one_row(x) and not slow_bf16_cpu(x):
            # A batch-1 decode step: one product with a fused (C, q + k + v) copy of the three
            # weights instead of three small ones (each small GEMV pays a fixed cost).
            weights = tuple(p.weight for p in projections)
            fused = derived_tensor(self, "_qkv_t", weights,
                                   lambda: torch.cat(weights).detach().t().contiguous())
            if fused is not None:
                bias = None
                if self.q_proj.bias is not None:
                    biases = tuple(p.bias for p in projections)
                    bias = derived_tensor(self, "_qkv_bias", biases,
                                          lambda: torch.cat(biases).detach())
                qkv = transposed_product(x, fused, bias)
                return qkv.split([p.out_features for p in projections], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)
