"""A memory planner: per-rank bytes of parameters, gradients, optimizer state and activations
for each layout (DDP, ZeRO-1/2/3, tensor parallel, activation checkpointing) before a run.

Counts follow what our model and torch actually keep (checked against torch's MemTracker on
CPU in tests/test_plan.py):
- parameters in fp32 (the master copy), AdamW's two fp32 states, fp32 gradients; ZeRO-1 shards
  the optimizer state over data ranks, ZeRO-2 (FSDP without resharding after forward) also the
  gradients, ZeRO-3 (FSDP) also the parameters, plus the gathered copy of the block at work;
- activations saved for backward, per token and layer, from our block's code: the two norm
  inputs and outputs, q, k, v, the attention output and its reshaped copy, the MLP's hidden
  states (2 for GELU, 4 for SwiGLU); SDPA keeps no (T, T) scores; tensor parallelism divides
  what lives between the column- and row-parallel projections (and the norms' part under
  sequence parallelism); activation checkpointing keeps each block's input plus one block;
- the logits and their gradient (N x vocab, fp32), vocabulary-sharded under loss_parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scratchllm.model import GPT, GPTConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ZERO_STAGES = {"none": 0, "ddp": 0, "zero1": 1, "zero2": 2, "fsdp": 3}


@dataclass
class Layout:
    """One layout to plan: data parallel kind and degree, tensor degree, AC."""

    data: str = "none"  # none | ddp | zero1 | zero2 (fsdp, no reshard) | fsdp (ZeRO-3)
    data_size: int = 1
    tensor: int = 1
    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        parts = [f"{self.data}x{self.data_size}"] if self.data_size > 1 else []
        if self.tensor == 1 and self.data_size == 1:
            parts.append("single")
        if self.tensor > 1:
            parts.append(f"tp{self.tensor}" + ("+sp" if self.sequence_parallel else ""))
        if self.activation_checkpointing:
            parts.append("ac")
        return " ".join(parts)


@dataclass
class MemoryPlan:
    """Bytes per rank."""

    layout: Layout
    params: float
    grads: float
    optimizer: float
    activations: float  # saved activations + logits and their gradient
    per_sample: float  # activation bytes of one sequence (for the largest micro-batch)
    # DDP's gradient buckets live across steps; otherwise gradients (set to None after each
    # step) fill in during backward as the activations are freed: the peak is the larger.
    persistent_grads: bool = False

    @property
    def total(self) -> float:
        """The peak bytes per rank."""
        states = self.params + self.optimizer
        if self.persistent_grads:
            return states + self.grads + self.activations
        return states + max(self.grads, self.activations)

    def max_micro_batch(self, memory: float) -> int:
        """The largest micro-batch whose peak fits in `memory` bytes (0 if none)."""
        room = memory - self.params - self.optimizer - (self.grads if self.persistent_grads
                                                        else 0)
        if room < (0 if self.persistent_grads else self.grads):
            return 0
        return max(int(room // self.per_sample), 0)


def parameter_counts(config: GPTConfig) -> tuple[int, int, int]:
    """(block matrices that tensor parallelism shards, vocabulary matrices, the rest)."""
    with torch.device("meta"):
        model = GPT(config)
    blocks = vocab = other = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("blocks.") and p.ndim == 2:
            blocks += p.numel()
        elif name.startswith(("tok_emb", "lm_head")):
            vocab += p.numel()
        else:
            other += p.numel()
    return blocks, vocab, other


def plan_memory(config: GPTConfig, batch_size: int, layout: Layout,
                dtype: str = "float32") -> MemoryPlan:
    """The per-rank memory of training `config` with micro-batch `batch_size` under `layout`."""
    tp, dp = layout.tensor, layout.data_size
    stage = ZERO_STAGES[layout.data] if dp > 1 else 0
    blocks, vocab, other = parameter_counts(config)
    shard_vocab = config.vocab_size % tp == 0
    local = blocks / tp + (vocab / tp if shard_vocab else vocab) + other  # after TP
    # FSDP keeps fp32 parameter shards (ZeRO-3, and ZeRO-2-like between steps) and gathers
    # them, in the compute dtype, for the block at work (ZeRO-3) or for every block from
    # forward to backward (ZeRO-2); otherwise autocast keeps a low-precision copy of each weight.
    params = 4 * local / (dp if stage >= 2 else 1)
    grads = 4 * local / (dp if stage >= 2 else 1)
    optimizer = 8 * local / (dp if stage >= 1 else 1)
    compute = DTYPE_BYTES[dtype]
    if stage == 3:
        params += compute * blocks / tp / config.n_layer
    elif stage == 2:
        params += compute * local
    elif compute < 4:
        params += compute * local
    per_sample = _activations_per_sequence(config, layout, compute)
    return MemoryPlan(layout, params, grads, optimizer, per_sample * batch_size, per_sample,
                      persistent_grads=layout.data in ("ddp", "zero1") and dp > 1)


def _activations_per_sequence(c: GPTConfig, layout: Layout, compute: int) -> float:
    """Bytes saved for backward by one sequence of context_length tokens."""
    T, C, tp = c.context_length, c.n_embd, layout.tensor
    kv = C * c.n_kv_head / c.n_head
    hidden = c.mlp_hidden * (4 if c.mlp == "swiglu" else 2)
    norms = 4 * C / (tp if layout.sequence_parallel else 1)  # two norms: input and output
    sharded = (3 * C + 2 * kv + hidden) / tp  # q, k, v, attention out + its copy, the MLP
    dropout = (C * 2 / 4) if c.resid_dropout > 0 else 0  # bool masks, in units of 4 bytes
    layer = T * (4 * norms + compute * sharded + 4 * dropout)
    vocab = c.vocab_size / (tp if layout.loss_parallel else 1)
    head = T * (2 * 4 * C + 2 * 4 * vocab)  # final norm in/out; logits and their gradient
    if layout.activation_checkpointing:
        # Each block's input is kept; the head's tensors are freed before the first block is
        # recomputed in backward, so the peak is the larger of the two, not their sum.
        return T * 4 * C * c.n_layer + max(layer, head)
    return layer * c.n_layer + head


def layouts_for(world: int, tensor_degrees: list[int]) -> list[Layout]:
    """Every layout worth comparing on `world` ranks."""
    found = []
    for tp in tensor_degrees:
        if world % tp:
            continue
        dp = world // tp
        kinds = ["none"] if dp == 1 else (["ddp", "zero1", "zero2", "fsdp"] if tp == 1
                                          else ["fsdp"])
        for kind in kinds:
            for ac in (False, True):
                found.append(Layout(kind, dp, tp, sequence_parallel=tp > 1,
                                    loss_parallel=tp > 1, activation_checkpointing=ac))
    return found


def format_plan(config: GPTConfig, batch_size: int, world: int, memory: float | None,
                dtype: str = "float32", tensor_degrees: list[int] | None = None) -> str:
    """The planner's table: one row per layout, GB per rank, and the largest micro-batch."""
    gb = 1024 ** 3
    degrees = tensor_degrees or [d for d in (1, 2, 4, 8) if d <= world]
    blocks, vocab, other = parameter_counts(config)
    lines = [f"model: {blocks + vocab + other:,} parameters, {config.n_layer} layers, width "
             f"{config.n_embd}, context {config.context_length}; micro-batch {batch_size}, "
             f"{dtype}, {world} rank(s)" + (f" of {memory / gb:.0f} GB" if memory else ""),
             f"{'layout':<22}{'params':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'total':>9}"
             f"{'max batch':>11}{'sent/step':>11}"]
    for layout in layouts_for(world, degrees):
        p = plan_memory(config, batch_size, layout, dtype)
        fits = str(p.max_micro_batch(memory)) if memory else "-"
        lines.append(f"{layout.name:<22}{p.params / gb:>9.2f}{p.grads / gb:>9.2f}"
                     f"{p.optimizer / gb:>9.2f}{p.activations / gb:>9.2f}{p.total / gb:>9.2f}"
                     f"{fits:>11}"
                     f"{communication_bytes(config, batch_size, layout, dtype) / gb:>11.2f}")
    lines.append("(GB per rank; 'max batch' = the largest micro-batch that fits; 'sent/step' = "
                 "GB each rank sends per optimizer step; ZeRO-2 = FSDP with "
                 "reshard_after_forward=false)")
    return "\n".join(lines)


def communication_bytes(config: GPTConfig, batch_size: int, layout: Layout,
                        dtype: str = "float32", accumulation: int = 1) -> float:
    """Bytes each rank sends per optimizer step (ring collectives: an all-reduce of S bytes
    over n ranks sends 2 S (n-1)/n, an all-gather or reduce-scatter S (n-1)/n)."""
    dp, tp = layout.data_size, layout.tensor
    blocks, vocab, other = parameter_counts(config)
    local = blocks / tp + (vocab / tp if config.vocab_size % tp == 0 else vocab) + other
    compute = DTYPE_BYTES[dtype]
    sent = 0.0
    if dp > 1:
        ring = (dp - 1) / dp
        if layout.data in ("ddp", "zero1"):  # gradients once per step (no_sync micro-steps)
            sent += 2 * ring * 4 * local
            if layout.data == "zero1":  # each rank broadcasts its updated share of the params
                sent += ring * 4 * local
        else:  # FSDP: gather params (forward, and again in backward for ZeRO-3), scatter grads
            gathers = 2 if layout.data == "fsdp" else 1
            sent += accumulation * (gathers * ring * compute * local + ring * 4 * local)
    if tp > 1:  # two all-reduces per block forward, two backward, of (B, T, C) activations
        activation = batch_size * config.context_length * config.n_embd * compute
        sent += accumulation * 4 * config.n_layer * 2 * (tp - 1) / tp * activation
    return sent
