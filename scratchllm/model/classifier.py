"""A GPT turned into a text classifier: the LM head replaced by Linear(n_embd, num_classes).

The body keeps the GPT's parameter names (tok_emb, blocks.*, norm_f), so a pretrained
checkpoint loads into it unchanged; the new `head` reads one pooled vector per text: the
hidden state of the last real (non-padding) token, which under causal attention has seen the
whole text, or the mean over the real tokens. Batches are right-padded: with causal attention a
real token never sees the padding after it, so no attention mask is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.model.config import GPTConfig
from scratchllm.model.gpt import GPT

POOLINGS = ("last", "mean")


@dataclass
class ClassifierConfig:
    """The body's GPTConfig, the label names (their order gives the class ids), the pooling."""

    base: GPTConfig
    labels: list[str]
    pooling: str = "last"  # last (the last real token) | mean (over the real tokens)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a LoRA run's adapter settings

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise UserError(f"a classifier needs at least two distinct labels, got {self.labels}")
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown pooling {self.pooling!r}: choose {' or '.join(POOLINGS)}")

    def to_json(self) -> str:
        """config.json of a classifier checkpoint."""
        return json.dumps({"kind": "classifier", "labels": self.labels, "pooling": self.pooling,
                           "base": self.base.to_dict(), **self.extra}, indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        """The inverse of to_json (extra keys are kept in `extra`)."""
        known = {"kind", "labels", "pooling", "base"}
        return cls(GPTConfig.from_dict(data["base"]), list(data["labels"]),
                   data.get("pooling", "last"), {k: v for k, v in data.items() if k not in known})


class GPTClassifier(GPT):
    """GPT body + a classification head over one pooled hidden state per sequence."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config.base)
        del self.lm_head  # the vocabulary projection is not used: the head replaces it
        self.classifier_config = config
        self.head = nn.Linear(config.base.n_embd, len(config.labels))

    @classmethod
    def from_gpt(cls, gpt: GPT, labels: list[str], pooling: str = "last",
                 dropout: float | None = None) -> GPTClassifier:
        """A classifier whose body is a copy of `gpt`'s weights and whose head is new;
        dropout (if given) replaces the body's embedding, attention and residual dropout."""
        base = gpt.config
        if dropout is not None:
            base = replace(base, embd_dropout=dropout, attn_dropout=dropout,
                           resid_dropout=dropout)
        model = cls(ClassifierConfig(base, labels, pooling))
        body = {k: v for k, v in gpt.state_dict().items() if not k.startswith("lm_head.")}
        model.load_state_dict({**body, **{f"head.{k}": v for k, v in
                                          model.head.state_dict().items()}})
        return model.to(gpt.tok_emb.weight.device)

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits (B, num_classes) for right-padded ids (B, T) with real lengths (B,)."""
        B, T = idx.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=idx.device)
        h = self.hidden(idx)  # (B, T, C)
        if self.classifier_config.pooling == "last":
            pooled = h[torch.arange(B, device=idx.device), lengths - 1]  # (B, C)
        else:
            real = (self.arange[:T] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
            pooled = (h * real).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        return self.head(pooled)
