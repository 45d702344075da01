"""A preallocated key/value cache for incremental decoding, one per attention layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one layer, (B, kv_heads, max_seq, head_dim), written at given slots.

    Shapes never change from step to step (compile-friendly): attention always reads the whole
    buffer and a mask hides the slots not written yet.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq(self) -> int:
        """Number of slots (positions) the cache holds."""
        return self.k.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) at slots input_pos (T,); return both buffers."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def reset(self) -> None:
        """Forget everything written (zero the buffers in place)."""
        self.k.zero_()
        self.v.zero_()


def make_caches(n_layer: int, batch_size: int, n_kv_head: int, max_seq: int, head_dim: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                ) -> nn.ModuleList:
    """One KVCache per layer, kept outside the model so its state_dict never changes."""
    return nn.ModuleList(KVCache(batch_size, n_kv_head, max_seq, head_dim, dtype, device)
                         for _ in range(n_layer))
