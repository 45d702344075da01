"""Counting: parameters, training FLOPs per token, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

from scratchllm.model.config import GPTConfig


def count_params(cfg: GPTConfig, embeddings: bool = True) -> int:
    """Parameters of GPT(cfg), built on the meta device so no memory is used."""
    from scratchllm.model.gpt import GPT

    with torch.device("meta"):
        return GPT(cfg).num_params(embeddings=embeddings)


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token: 6N + 12 * n_layer * n_embd * seq_len.

    N counts every weight used in a matmul (the lm_head included, the lookup-only embedding
    tables not); the second term is attention's QK^T and AV, without discounting the mask.
    """
    seq_len = cfg.context_length if seq_len is None else seq_len
    n_matmul = count_params(cfg, embeddings=False) + cfg.vocab_size * cfg.n_embd  # + lm_head
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def mfu(cfg: GPTConfig, tokens_per_second: float, peak_flops: float,
        seq_len: int | None = None) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s."""
    return flops_per_token(cfg, seq_len) * tokens_per_second / peak_flops
