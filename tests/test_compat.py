"""Compatibility paths for the oldest torch we claim (pyproject: torch>=2.4)."""

import torch

from scratchllm.model import attention
from scratchllm.model.attention import explicit_attention, sdpa_attention


def test_grouped_query_sdpa_without_enable_gqa(monkeypatch):
    """torch 2.4's SDPA has no enable_gqa: k/v heads are repeated instead, same result."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def old_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        calls.append(k.shape[1])  # no enable_gqa keyword, as in torch 2.4
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    monkeypatch.setattr(attention, "SDPA_SHARES_KV_HEADS", False)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", old_sdpa)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 1, 6, 8, generator=g), torch.randn(2, 1, 6, 8, generator=g)
    out = sdpa_attention(q, k, v, causal=True)
    assert calls == [4]  # every query head got its own copy of the one kv head
    torch.testing.assert_close(out, explicit_attention(q, k, v, causal=True))
