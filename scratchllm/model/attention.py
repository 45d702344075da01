"""Causal self-attention: the kernel (two interchangeable paths) and the module around it."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.model.cache import KVCache
from scratchllm.model.config import GPTConfig
from scratchllm.model.fastpath import (
    bf16_attention_by_gemms,
    fused_qkv,
    sdpa_via_fp32,
    slow_bf16_cpu,
)
from scratchllm.model.layers import Linear, apply_rope, make_dropout

# SDPA reads grouped-query k/v heads itself (enable_gqa) from torch 2.5 on.
SDPA_SHARES_KV_HEADS = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def causal_bias(T: int, S: int, device: torch.device | None = None) -> Tensor:
    """(T, S) additive mask, 0 where query i may see key j <= i + (S - T), else -inf.

    The T queries are the last T positions of the S keys (a prefix already in the keys).
    """
    return torch.full((T, S), float("-inf"), device=device).triu(S - T + 1)


def additive(mask: Tensor) -> Tensor:
    """A boolean mask (True = may attend) as an additive fp32 one (0 / -inf); floats pass."""
    if mask.dtype != torch.bool:
        return mask.float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                       causal: bool, dropout_p: float = 0.0, fp32_scores: bool = True) -> Tensor:
    """The teaching path: scores, an additive mask (-inf hides a key), softmax, weights @ values.

    q (B, H, T, hd); k, v (B, H_kv, S, hd); mask (B|1, H|1, T, S), additive or boolean
    (True = may attend): padding, packed documents, ALiBi. causal=True also hides every key
    after the query (the queries being the last T of the S positions). fp32_scores=False keeps
    the scores in q's dtype (bf16: torch's softmax still computes in fp32 and rounds its output).
    """
    if k.shape[1] != q.shape[1]:  # grouped-query: each kv head serves n_head/n_kv_head heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if fp32_scores:
        scores = scores.float()
    if causal:
        scores = scores + causal_bias(*scores.shape[-2:], device=q.device).to(scores.dtype)
    if mask is not None:
        scores = scores + additive(mask).to(scores.dtype)
    weights = torch.softmax(scores, dim=-1).to(q.dtype)  # rows sum to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v  # (B, H, T, hd)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                   causal: bool, dropout_p: float = 0.0) -> Tensor:
    """The fast path: torch's fused scaled_dot_product_attention, same inputs and result."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and not SDPA_SHARES_KV_HEADS:  # torch < 2.5: give every query head its own copy
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    # SDPA takes a mask or is_causal, and its is_causal aligns the triangle top-left when
    # T != S: fold causality into the mask in both cases.
    if causal and (mask is not None or q.shape[-2] != k.shape[-2]):
        bias = causal_bias(q.shape[-2], k.shape[-2], device=q.device)
        mask = bias if mask is None else additive(mask) + bias
        causal = False
    if slow_bf16_cpu(q):
        return sdpa_via_fp32(q, k, v, mask, causal, dropout_p, gqa)
    if bf16_attention_by_gemms(q, k.shape[-2]):
        return explicit_attention(q, k, v, mask, causal=causal, dropout_p=dropout_p,
                                  fp32_scores=False)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal, **({"enable_gqa": True} if gqa else {}))


class AttnInputs(NamedTuple):
    """What every layer's attention needs besides x; built once per forward by the model."""

    rope: tuple[Tensor, Tensor] | None  # cos, sin, each (B|1, 1, T, head_dim)
    mask: Tensor | None  # additive float (B|1, H|1, T, S) or boolean (True = may attend)
    causal: bool  # the kernel also hides keys after each query (no mask needed for that)
    input_pos: Tensor | None  # (T,) cache slots written by this call; None without a cache


class Attention(nn.Module):
    """What every attention module holds: q/k/v/o projections (multi-head, grouped-query or
    multi-query), dropout, and the configured kernel. Subclasses say where q, k, v come from."""

    def __init__(self, cfg: GPTConfig) -> None:  # or any config with these fields (seq2seq's)
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = make_dropout(cfg.resid_dropout)
        self.kernel = explicit_attention if cfg.attention == "explicit" else sdpa_attention


class CausalSelfAttention(Attention):
    """Self-attention: q, k and v from the same x, causal unless the inputs say otherwise."""

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
        y = self.kernel(q, k, v, inputs.mask, causal=inputs.causal,
                        dropout_p=dropout_p)  # (B, H, T, hd)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C) from (B, T, H * hd)
        return y if self.resid_dropout is None else self.resid_dropout(y)

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, T, features) of x (B, T, C)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        # The fused batch-1 decode product only where each projection is a plain Linear with no
        # hooks: a wrapped one (LoRA, quantized) must run its own forward.
        if all(type(p) is Linear and not p._forward_hooks and not p._forward_pre_hooks
               for p in projections):
            qkv = fused_qkv(projections, self, x)
            if qkv is not None:
                return qkv
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)
