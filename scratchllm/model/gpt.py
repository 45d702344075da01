"""The decoder-only transformer (GPT-2 and LLaMA families, chosen by GPTConfig)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_bytes, atomic_write_text, read_json_object
from scratchllm.model.attention import AttnInputs, CausalSelfAttention
from scratchllm.model.cache import KVCache, make_caches
from scratchllm.model.config import GPTConfig
from scratchllm.model.layers import (
    Linear,
    alibi_slopes,
    make_dropout,
    make_mlp,
    make_norm,
    rope_tables,
    sinusoidal_table,
)
from scratchllm.model.loss import lm_loss

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class Block(nn.Module):
    """One pre-norm transformer layer: attention then MLP, each added to the residual stream."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)

    def forward(self, x: Tensor, inputs: AttnInputs, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), inputs, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token embedding, n_layer Blocks, final norm, and a (possibly tied) output projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.drop = make_dropout(cfg.embd_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.kv_heads = cfg.n_kv_head  # per process: tensor parallelism splits the heads
        self.init_buffers()
        self.init_weights()

    # ---- setup ------------------------------------------------------------------------------

    def init_buffers(self) -> None:
        """(Re)compute the fixed tables; call after `to_empty()` when built on the meta device."""
        cfg, device = self.config, self.tok_emb.weight.device
        n = cfg.context_length
        # Non-persistent: derived from the config, so they never enter state_dict().
        # Every mask and position is a row or slice of these tables: a decode step indexes them
        # instead of building aranges and masks anew.
        self.register_buffer("arange", torch.arange(n, device=device), persistent=False)
        causal = torch.full((n, n), float("-inf"), device=device).triu(1)  # [i, j]: 0 if j <= i
        self.register_buffer("causal_bias", causal, persistent=False)  # additive, fp32
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(n, cfg.n_embd).to(device),
                                 persistent=False)
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(n, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if cfg.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head).to(device),
                                 persistent=False)

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections / sqrt(2L)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()
        # Each layer adds two outputs to the residual stream; scale so its variance stays ~1.
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def shard_heads(self, rank: int, degree: int) -> None:
        """Tensor parallelism: this process computes heads [rank * H / degree, ...) of every
        layer, so its KV caches hold n_kv_head / degree heads and ALiBi uses those heads' slopes."""
        self.kv_heads = self.config.n_kv_head // degree
        if self.config.pos_encoding == "alibi":
            self.alibi_slopes = self.alibi_slopes.view(degree, -1)[rank].clone()

    def make_cache(self, batch_size: int, max_seq: int | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None
                   ) -> nn.ModuleList:
        """Preallocated KV caches (one per layer) for incremental decoding."""
        cfg = self.config
        max_seq = cfg.context_length if max_seq is None else max_seq
        if not 0 < max_seq <= cfg.context_length:
            raise UserError(f"cache length {max_seq} must be in 1..context_length "
                            f"({cfg.context_length}): shorten the generation")
        weight = self.tok_emb.weight
        return make_caches(cfg.n_layer, batch_size, self.kv_heads, max_seq, cfg.head_dim,
                           dtype or weight.dtype, device or weight.device)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None, *,
                attention_mask: Tensor | None = None, positions: Tensor | None = None,
                cache: nn.ModuleList | None = None, input_pos: Tensor | None = None,
                document_ids: Tensor | None = None,
                logits_to_keep: int = 0) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab) for token ids idx (B, T); with targets, (logits, mean loss).

        targets are aligned with idx (already shifted; -100 = ignore). attention_mask (B, L),
        1 = real token, 0 = padding; positions then count real tokens only, so left padding works.
        With a cache (make_cache), input_pos (T,) gives the cache slots that idx fills.
        document_ids (B, T) packs several documents into one row: a token attends only to
        earlier tokens of its own document (pass positions restarting per document too).
        logits_to_keep > 0 computes logits (and the loss) for the last that many positions only:
        a prefill that needs the next token's logits skips T - 1 rows of the vocab projection.
        """
        T = idx.shape[1]
        x = self.hidden(idx, attention_mask=attention_mask, positions=positions, cache=cache,
                        input_pos=input_pos, document_ids=document_ids)
        if 0 < logits_to_keep < T:
            x = x[:, -logits_to_keep:]  # (B, k, C)
            if targets is not None:
                targets = targets[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T|k, vocab)
        if targets is None:
            return logits
        return logits, lm_loss(logits, targets)

    def hidden(self, idx: Tensor, *, attention_mask: Tensor | None = None,
               positions: Tensor | None = None, cache: nn.ModuleList | None = None,
               input_pos: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """The final-norm hidden states (B, T, C) that the output projection reads (a task head
        such as a classifier reads them instead); arguments as for forward()."""
        B, T = idx.shape
        inputs, positions = self._attn_inputs(B, T, attention_mask, positions, cache, input_pos,
                                              document_ids)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.sin_table[positions]
        if self.drop is not None:
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, inputs, cache[i] if cache is not None else None)
        return self.norm_f(x)

    def _attn_inputs(self, B: int, T: int, attention_mask: Tensor | None,
                     positions: Tensor | None, cache: nn.ModuleList | None,
                     input_pos: Tensor | None, document_ids: Tensor | None = None
                     ) -> tuple[AttnInputs, Tensor]:
        """Positions (B|T shaped), rotary angles and the additive mask shared by every layer."""
        cfg = self.config
        if document_ids is not None and (cache is not None or document_ids.shape != (B, T)):
            raise UserError(f"document_ids must be (batch, seq) = ({B}, {T}) and are for "
                            "training (no KV cache)")
        if cache is not None:
            if input_pos is None or input_pos.shape != (T,):
                raise UserError(f"with a KV cache pass input_pos, the {T} cache slots of idx")
            S = cache[0].max_seq  # keys span the whole cache: fixed shapes for every step
        else:
            if T > cfg.context_length:
                raise UserError(f"sequence length {T} exceeds context_length "
                                f"{cfg.context_length}: crop the input")
            S, input_pos = T, self.arange[:T]
        alibi = cfg.pos_encoding == "alibi"
        keep = None  # (B, S) True = real token
        if attention_mask is not None:
            keep = attention_mask.to(device=self.arange.device, dtype=torch.bool)
            if keep.ndim != 2 or keep.shape[0] != B or keep.shape[1] > S:
                raise UserError(f"attention_mask must be (batch, <= {S}) of 0/1, "
                                f"got {tuple(attention_mask.shape)}")
            if keep.shape[1] < S:  # slots not written yet: the causal mask hides them anyway
                keep = torch.cat([keep, keep.new_ones(B, S - keep.shape[1])], dim=1)
        # Position of every slot: real tokens count from 0 in each row (left padding works).
        # Without padding slot j holds position j, so a token's position is its slot.
        slot_pos = self.arange[:S] if keep is None else (keep.long().cumsum(-1) - 1).clamp(min=0)
        if positions is None:
            positions = input_pos if keep is None else slot_pos[:, input_pos]  # (T,) or (B, T)

        rope = None
        if cfg.pos_encoding == "rope":
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (..., T, hd)
            rope = (cos.unsqueeze(-3), sin.unsqueeze(-3))  # (1|B, 1, T, hd) after broadcasting

        mask = None
        if cache is not None or keep is not None or alibi or document_ids is not None:
            # Rows input_pos of the precomputed (n, n) causal table, cut to the S key slots.
            mask = self.causal_bias[:, :S].index_select(0, input_pos).float()  # (T, S) 0 / -inf
            if keep is not None:  # hide padding keys; a padding query still sees itself (no NaN)
                seen = keep[:, None, :] | (self.arange[:S] == input_pos[:, None])  # (B, T, S)
                mask = mask.masked_fill(~seen, float("-inf"))
            if document_ids is not None:  # packed documents: a query sees only its own one
                same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
                mask = mask.masked_fill(~same, float("-inf"))
            mask = mask.unsqueeze(-3)  # (B|1, 1, T, S) broadcast over heads
            if alibi:  # linear penalty on the query-key distance
                key_pos = positions if cache is None else slot_pos  # (..., S)
                dist = key_pos.unsqueeze(-2) - positions.unsqueeze(-1)  # (..., T, S), <= 0 if seen
                bias = self.alibi_slopes[:, None, None] * dist.unsqueeze(-3).float()
                mask = mask + bias  # (B|1, H, T, S)
            if mask.ndim == 3:
                mask = mask[None]
        # Without a mask the kernel applies plain causality itself (SDPA's is_causal fast path);
        # a mask built here already holds it.
        inputs = AttnInputs(rope, mask, mask is None, input_pos if cache is not None else None)
        return inputs, positions

    # ---- counting ---------------------------------------------------------------------------

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (tied weights once); embeddings=False drops embedding and lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            skip = {id(self.tok_emb.weight)}
            if hasattr(self, "lm_head"):
                skip.add(id(self.lm_head.weight))
            if self.config.pos_encoding == "learned":
                skip.add(id(self.pos_emb.weight))
            n -= sum(p.numel() for p in self.parameters() if id(p) in skip)
        return n

    # ---- save / load ------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write model.safetensors + config.json (GPTConfig) into directory `path`."""
        return save_model_files(path, self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> GPT:
        """Load a directory written by save_pretrained (never unpickles anything)."""
        path = Path(path)
        config = load_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{weights} not found: point at a directory saved by save_pretrained")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:  # only a damaged or unreadable file is reported as one (not, say, a bad device)
            state = load_file(weights, device=str(device))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{weights} is not a readable safetensors file ({e}): re-save it") \
                from None
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(state, assign=True)
        model.init_buffers()
        return model.to(device)

    def load_weights(self, state: dict[str, Tensor], assign: bool = False) -> None:
        """load_state_dict that accepts a missing tied lm_head and fails with a clear message."""
        state = dict(state)
        tied = self.config.tie_embeddings and hasattr(self, "lm_head")  # a task head is never tied
        if tied:
            state.pop("lm_head.weight", None)
        expected = set(self.state_dict()) - ({"lm_head.weight"} if tied else set())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(f"weights do not match the config: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}: check that config.json belongs to these weights")
        for key, value in state.items():
            want = self.state_dict()[key].shape
            if value.shape != want:
                raise UserError(f"weight {key} has shape {tuple(value.shape)}, config expects "
                                f"{tuple(want)}: check that config.json belongs to these weights")
        self.load_state_dict(state, strict=False, assign=assign)
        if tied:
            self.lm_head.weight = self.tok_emb.weight  # assign=True replaced the shared Parameter


def load_config(path: str | os.PathLike) -> GPTConfig:
    """Read the GPTConfig in `path`/config.json (or a JSON file) with clear errors."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    data = read_json_object(file, "point at a directory saved by save_pretrained")
    if "model_type" in data:
        raise UserError(f"{file} is a Hugging Face config: load it with "
                        "scratchllm.model.convert.from_hf")
    return GPTConfig.from_dict(data)


def save_model_files(path: str | os.PathLike, state: dict[str, Tensor], config) -> Path:
    """Write `state` as model.safetensors and config.to_json() as config.json into `path`.

    A tensor that shares storage with an earlier one (tied embeddings) is written once; the
    loader restores the tie. Any state dict works: a full one gathered from shards, or only an
    adapter's tensors.
    """
    from safetensors.torch import save

    path = Path(path)
    seen, tensors = set(), {}
    for key, value in state.items():
        ptr = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
               tuple(value.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[key] = value.detach().contiguous()
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_NAME, config.to_json())
    return path
