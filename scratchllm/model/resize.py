"""Growing a model's vocabulary (new special tokens) without touching the rows it has."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from scratchllm.errors import UserError
from scratchllm.model.gpt import GPT


def _grown(weight: torch.Tensor, new_rows: int) -> nn.Parameter:
    """weight (V, C) with new_rows more rows, each the mean of the old ones (in fp32)."""
    with torch.no_grad():
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, C)
        grown = torch.cat([weight, mean.expand(new_rows, -1)], dim=0)  # (V + new_rows, C)
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


def grow_vocab(model: GPT, new_vocab_size: int) -> GPT:
    """Give `model` new_vocab_size token rows in place: old rows unchanged, new ones the mean."""
    old = model.config.vocab_size
    if new_vocab_size < old:
        raise UserError(f"cannot shrink the vocabulary from {old} to {new_vocab_size} ids")
    if new_vocab_size == old:
        return model
    added = new_vocab_size - old
    tied = model.config.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    model.tok_emb.weight = _grown(model.tok_emb.weight, added)
    model.tok_emb.num_embeddings = new_vocab_size
    if tied:
        model.lm_head.weight = model.tok_emb.weight
    else:  # untied: new output rows are the mean output row
        model.lm_head.weight = _grown(model.lm_head.weight, added)
    model.lm_head.out_features = new_vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=new_vocab_size)
    return model
