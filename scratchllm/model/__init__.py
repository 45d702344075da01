"""The decoder-only transformer: config, model, KV cache, loss, counting helpers."""

from scratchllm.model.attention import (
    AttnInputs,
    CausalSelfAttention,
    explicit_attention,
    sdpa_attention,
)
from scratchllm.model.cache import KVCache, make_caches
from scratchllm.model.config import PRESETS, GPTConfig
from scratchllm.model.flops import count_params, flops_per_token, mfu
from scratchllm.model.gpt import GPT, Block, load_config
from scratchllm.model.loss import IGNORE_INDEX, lm_loss, lm_loss_sum

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "Block", "CausalSelfAttention", "AttnInputs", "KVCache",
    "make_caches", "explicit_attention", "sdpa_attention", "lm_loss", "lm_loss_sum",
    "IGNORE_INDEX", "count_params", "flops_per_token", "mfu", "load_config",
]
