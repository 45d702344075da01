"""The encoder-decoder transformer of "Attention Is All You Need" (translation, summarization).

An encoder reads the source with bidirectional self-attention (padding keys hidden); a decoder
writes the target with causal self-attention plus cross-attention to the encoder's output.
It reuses the GPT's parts: the self-attention module and kernels (with their explicit `causal`
flag and masks), Linear, norms, the KV cache and the position tables. Source, target and output
share one embedding matrix (one BPE over both languages).

Choices the config makes: pre-norm (default: trains without a long warmup) or the paper's
post-norm; sinusoidal (default), learned or rotary positions; the sinusoid's layout (the
paper's interleaved sin/cos, or fairseq's and Marian's halves); embeddings scaled by
sqrt(n_embd); the FFN's activation; label smoothing in the loss. With post-norm, split
sinusoids and scaled embeddings it is Marian's layout, so Hugging Face's MarianMTModel weights
load unchanged (model/marian.py).

Decoding (`start_decoding`) encodes the source once and computes every decoder layer's
cross-attention keys and values from it once; each step then runs the decoder on one new token
against its own preallocated KV cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.fileio import read_json_object
from scratchllm.model.attention import (
    Attention,
    AttnInputs,
    CausalSelfAttention,
)
from scratchllm.model.cache import KVCache, make_caches
from scratchllm.model.config import ATTENTIONS, NORMS, _suggest
from scratchllm.model.gpt import CONFIG_NAME, WEIGHTS_NAME, save_model_files
from scratchllm.model.layers import (
    ACTIVATIONS,
    ActMLP,
    Linear,
    make_dropout,
    make_norm,
    rope_tables,
    sinusoidal_table,
    sinusoidal_table_split,
)
from scratchllm.model.loss import IGNORE_INDEX, lm_loss_sum

KIND = "seq2seq"  # config.json's "kind": what tells a seq2seq checkpoint from a GPT one
POS_ENCODINGS = ("sinusoidal", "learned", "rope")
NORM_POSITIONS = ("pre", "post")
SINUSOID_LAYOUTS = ("interleaved", "split")


@dataclass
class Seq2SeqConfig:
    """Shape and flavour of an encoder-decoder transformer; presets via Seq2SeqConfig.preset."""

    vocab_size: int = 8000  # shared by source, target and output (one tokenizer for both)
    context_length: int = 256  # longest source and longest target (position tables, cache)
    n_encoder_layer: int = 3
    n_decoder_layer: int = 3
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head
    n_embd: int = 256
    mlp_hidden: int | None = None  # None: 4 * n_embd
    activation: str = "relu"  # relu (the paper) | gelu | gelu_tanh | silu
    embd_dropout: float = 0.1  # on embeddings + positions
    attn_dropout: float = 0.0  # on attention weights
    resid_dropout: float = 0.1  # on each sub-layer's output before the residual add
    bias: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre (x + f(norm(x)), final norms) | post (norm(x + f(x)))
    pos_encoding: str = "sinusoidal"  # sinusoidal | learned | rope
    sinusoid_layout: str = "interleaved"  # interleaved (the paper) | split (fairseq, Marian)
    rope_theta: float = 10000.0
    scale_embeddings: bool = True  # token embeddings * sqrt(n_embd), as the paper
    tie_embeddings: bool = True  # the output projection is the shared embedding matrix
    output_bias: bool = False  # a bias on the logits (Marian's final_logits_bias)
    label_smoothing: float = 0.1
    attention: str = "sdpa"  # sdpa | explicit (the teaching path); same result
    pad_id: int = 0  # padding (never a target)
    bos_id: int = 0  # the decoder's first input
    eos_id: int = 0  # ends the source and the target

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        self.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise UserError with a one-line fix for any inconsistent field."""
        for name in ("vocab_size", "context_length", "n_encoder_layer", "n_decoder_layer",
                     "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"Seq2SeqConfig.{name} must be a positive integer, got {value!r}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"Seq2SeqConfig.{name} must be in [0, 1), got {value!r}")
        for name, choices in (("activation", tuple(ACTIVATIONS)), ("norm", NORMS),
                              ("norm_position", NORM_POSITIONS), ("pos_encoding", POS_ENCODINGS),
                              ("sinusoid_layout", SINUSOID_LAYOUTS), ("attention", ATTENTIONS)):
            value = getattr(self, name)
            if value not in choices:
                raise UserError(f"unknown Seq2SeqConfig.{name} {value!r}"
                                f"{_suggest(str(value), choices)}: choose one of "
                                f"{', '.join(choices)}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd}) and "
                            f"n_kv_head ({self.n_kv_head}) must divide n_head")
        if self.n_embd % 2 or (self.pos_encoding == "rope" and self.head_dim % 2):
            raise UserError(f"positions need an even n_embd (and an even head_dim for rope), got "
                            f"n_embd {self.n_embd}, head_dim {self.head_dim}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"Seq2SeqConfig.{name} = {getattr(self, name)} is not a token id "
                                f"(0..{self.vocab_size - 1})")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise UserError("Seq2SeqConfig.norm_eps and rope_theta must be positive")

    # ---- presets and serialisation -------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Seq2SeqConfig:
        """A named configuration (see PRESETS), with keyword overrides."""
        if name not in PRESETS:
            raise UserError(f"unknown seq2seq preset {name!r}{_suggest(name, list(PRESETS))}:"
                            f" choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Seq2SeqConfig:
        """Build from a plain dict (a 'kind' key is allowed); unknown keys are an error."""
        data = {k: v for k, v in data.items() if k != "kind"}
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise UserError(f"unknown Seq2SeqConfig field {key!r}{_suggest(key, names)}:"
                                " remove it or fix its name")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """config.json of a seq2seq checkpoint: the fields plus kind = "seq2seq"."""
        return json.dumps({"kind": KIND, **self.to_dict()}, indent=2) + "\n"


_PAPER = dict(norm_position="post", activation="relu", embd_dropout=0.1, resid_dropout=0.1,
              label_smoothing=0.1, scale_embeddings=True, pos_encoding="sinusoidal")
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's base model (65M parameters with its 37k shared BPE vocabulary).
    "transformer-base": dict(vocab_size=37000, context_length=512, n_encoder_layer=6,
                             n_decoder_layer=6, n_head=8, n_embd=512, mlp_hidden=2048, **_PAPER),
    "transformer-big": dict(vocab_size=37000, context_length=512, n_encoder_layer=6,
                            n_decoder_layer=6, n_head=16, n_embd=1024, mlp_hidden=4096,
                            **{**_PAPER, "embd_dropout": 0.3, "resid_dropout": 0.3}),
    # CPU-sized: trains on a few thousand sentence pairs in minutes (pre-norm: no long warmup).
    "seq2seq-small": dict(vocab_size=8000, context_length=256, n_encoder_layer=3,
                          n_decoder_layer=3, n_head=4, n_embd=256, mlp_hidden=1024),
    "seq2seq-tiny": dict(vocab_size=4000, context_length=128, n_encoder_layer=2,
                         n_decoder_layer=2, n_head=4, n_embd=128, mlp_hidden=512),
}


# ---- layers --------------------------------------------------------------------------------


def _sublayer(x: Tensor, norm: nn.Module, f, post: bool) -> Tensor:
    """One residual sub-layer: pre-norm x + f(norm(x)), or the paper's post-norm norm(x + f(x))."""
    return norm(x + f(x)) if post else x + f(norm(x))


class CrossAttention(Attention):
    """The decoder's queries attend to the encoder's output (its keys and values, computed once)."""

    def memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H_kv, S, hd) of the encoder output memory (B, S, C)."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = self.kernel(q, *kv, mask, causal=False, dropout_p=dropout_p)  # (B, H, T, hd)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        return y if self.resid_dropout is None else self.resid_dropout(y)


class EncoderLayer(nn.Module):
    """Bidirectional self-attention then the FFN, each a residual sub-layer."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)  # our self-attention; inputs.causal=False here
        self.norm2 = make_norm(cfg)
        self.mlp = ActMLP(cfg.n_embd, cfg.mlp_hidden, cfg.activation, cfg.bias, cfg.resid_dropout)

    def forward(self, x: Tensor, inputs: AttnInputs) -> Tensor:
        x = _sublayer(x, self.norm1, lambda h: self.attn(h, inputs), self.post)
        return _sublayer(x, self.norm2, self.mlp, self.post)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the source, then the FFN."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.self_attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = make_norm(cfg)
        self.mlp = ActMLP(cfg.n_embd, cfg.mlp_hidden, cfg.activation, cfg.bias, cfg.resid_dropout)

    def forward(self, x: Tensor, inputs: AttnInputs, memory_kv: tuple[Tensor, Tensor],
                memory_mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        x = _sublayer(x, self.norm1, lambda h: self.self_attn(h, inputs, cache), self.post)
        x = _sublayer(x, self.norm2, lambda h: self.cross_attn(h, memory_kv, memory_mask),
                      self.post)
        return _sublayer(x, self.norm3, self.mlp, self.post)


# ---- the model -----------------------------------------------------------------------------


class Seq2Seq(nn.Module):
    """Shared embedding, encoder layers, decoder layers, and the (tied) output projection."""

    is_encoder_decoder = True  # what generation code checks to pick the source-target path

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.enc_pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
            self.dec_pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.drop = make_dropout(cfg.embd_dropout)
        self.encoder_blocks = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layer))
        self.decoder_blocks = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layer))
        if cfg.norm_position == "pre":  # pre-norm leaves the residual stream unnormalised
            self.encoder_norm = make_norm(cfg)
            self.decoder_norm = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.output_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_buffers()
        self.init_weights()

    def init_buffers(self) -> None:
        """(Re)compute the fixed tables; call after `to_empty()` when built on the meta device."""
        cfg, device = self.config, self.tok_emb.weight.device
        n = cfg.context_length
        self.register_buffer("arange", torch.arange(n, device=device), persistent=False)
        causal = torch.full((n, n), float("-inf"), device=device).triu(1)  # [i, j]: 0 if j <= i
        self.register_buffer("causal_bias", causal, persistent=False)
        if cfg.pos_encoding == "sinusoidal":
            table = (sinusoidal_table if cfg.sinusoid_layout == "interleaved"
                     else sinusoidal_table_split)(n, cfg.n_embd)
            self.register_buffer("sin_table", table.to(device), persistent=False)
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(n, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def init_weights(self) -> None:
        """fairseq's initialisation: Xavier-uniform matrices, zero biases, and embeddings
        N(0, n_embd**-0.5), so that scaled embeddings (and tied logits) start near unit size."""
        std = self.config.n_embd ** -0.5
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight is not self.tok_emb.weight:
                nn.init.xavier_uniform_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, src: Tensor, tgt: Tensor, targets: Tensor | None = None, *,
                src_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab) for target inputs tgt (B, T) given sources src (B, S); with
        targets (B, T; -100 = ignore), (logits, mean label-smoothed loss).

        src_mask (B, S): 1 = real token, 0 = padding (right-padded rows). Targets are
        right-padded too: under causal attention a real token never sees the padding after it.
        """
        memory = self.encode(src, src_mask)
        logits = self.decode(tgt, self.memory_kv(memory), src_mask)
        if targets is None:
            return logits
        loss, count = self.loss_sum(logits, targets)
        return logits, loss / count.clamp(min=1)

    def loss_sum(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Label-smoothed cross-entropy summed over real targets, and their count."""
        return smoothed_loss_sum(logits, targets, self.config.label_smoothing)

    def embed(self, ids: Tensor, positions: Tensor, pos_emb: str) -> Tensor:
        """Token embeddings (scaled) plus positions (not for rope), then dropout."""
        cfg = self.config
        x = self.tok_emb(ids)  # (B, T, C)
        if cfg.scale_embeddings:
            x = x * math.sqrt(cfg.n_embd)
        if cfg.pos_encoding == "sinusoidal":
            x = x + self.sin_table[positions]
        elif cfg.pos_encoding == "learned":
            x = x + getattr(self, pos_emb)(positions)
        return x if self.drop is None else self.drop(x)

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.config.pos_encoding != "rope":
            return None
        return self.rope_cos[positions][None, None], self.rope_sin[positions][None, None]

    def _check_length(self, n: int, what: str) -> None:
        if n > self.config.context_length:
            raise UserError(f"{what} has {n} tokens, more than context_length "
                            f"{self.config.context_length}: shorten it")

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """The encoder output (B, S, C) for sources src (B, S) with padding mask src_mask."""
        S = src.shape[1]
        self._check_length(S, "the source")
        positions = self.arange[:S]
        inputs = AttnInputs(self._rope(positions), self._key_mask(src_mask), False, None)
        x = self.embed(src, positions, "enc_pos_emb")
        for block in self.encoder_blocks:
            x = block(x, inputs)
        return self.encoder_norm(x) if hasattr(self, "encoder_norm") else x

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's cross-attention keys and values of the encoder output: computed
        once per source, then reused by every decoding step."""
        return [block.cross_attn.memory(memory) for block in self.decoder_blocks]

    def decode(self, tgt: Tensor, memory_kv: list[tuple[Tensor, Tensor]],
               src_mask: Tensor | None = None, cache: nn.ModuleList | None = None,
               input_pos: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) of target inputs tgt (B, T) against memory_kv; with a cache
        (make_cache), input_pos (T,) are the target positions (cache slots) tgt fills."""
        T = tgt.shape[1]
        if cache is None:
            self._check_length(T, "the target")
            positions, mask, causal = self.arange[:T], None, True  # the kernel's causal path
        else:
            if input_pos is None or input_pos.shape != (T,):
                raise UserError(f"with a KV cache pass input_pos, the {T} cache slots of tgt")
            positions, causal = input_pos, False
            # Rows input_pos of the causal table over all cache slots: unwritten ones are hidden.
            mask = self.causal_bias[:, :cache[0].max_seq].index_select(0, input_pos)[None, None]
        inputs = AttnInputs(self._rope(positions), mask, causal,
                            input_pos if cache is not None else None)
        memory_mask = self._key_mask(src_mask)
        x = self.embed(tgt, positions, "dec_pos_emb")
        for i, block in enumerate(self.decoder_blocks):
            x = block(x, inputs, memory_kv[i], memory_mask, cache[i] if cache is not None else None)
        if hasattr(self, "decoder_norm"):
            x = self.decoder_norm(x)
        return self.lm_head(x)

    def _key_mask(self, src_mask: Tensor | None) -> Tensor | None:
        """(B, 1, 1, S) boolean, True = a real source token a query may attend to."""
        if src_mask is None:
            return None
        return src_mask.to(device=self.arange.device, dtype=torch.bool)[:, None, None, :]

    # ---- decoding ---------------------------------------------------------------------------

    def make_cache(self, batch_size: int, max_seq: int, dtype: torch.dtype | None = None
                   ) -> nn.ModuleList:
        """Preallocated self-attention KV caches (one per decoder layer)."""
        cfg, weight = self.config, self.tok_emb.weight
        return make_caches(cfg.n_decoder_layer, batch_size, cfg.n_kv_head, max_seq, cfg.head_dim,
                           dtype or weight.dtype, weight.device)

    def start_decoding(self, sources: list[list[int]], max_new_tokens: int, copies: int = 1,
                       use_cache: bool = True, cache_cross: bool = True) -> DecodeState:
        """A DecodeState for the sources (each ending in eos), every one repeated `copies`
        times (beams); the encoder runs once per source."""
        cfg = self.config
        if not sources or any(not s for s in sources):
            raise UserError("a source is empty: give every source at least one token")
        for ids in sources:
            if min(ids) < 0 or max(ids) >= cfg.vocab_size:
                raise UserError(f"source token ids must be in 0..{cfg.vocab_size - 1}: use the "
                                "tokenizer the model was trained with")
            self._check_length(len(ids), "a source")
        src, mask = pad_rows(sources, cfg.pad_id, self.arange.device)
        return DecodeState(self, src, mask, max_new_tokens, copies, use_cache, cache_cross)

    # ---- counting, save / load --------------------------------------------------------------

    def num_params(self) -> int:
        """Parameter count (tied weights once)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write model.safetensors + config.json (Seq2SeqConfig) into directory `path`."""
        return save_model_files(path, self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu"
                        ) -> Seq2Seq:
        """Load a directory written by save_pretrained (or a seq2seq training checkpoint)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        config = load_seq2seq_config(path)
        try:
            state = load_file(path / WEIGHTS_NAME, device=str(device))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path / WEIGHTS_NAME} is not a readable safetensors file ({e}): "
                            "point at a seq2seq checkpoint") from None
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(state, assign=True)
        model.init_buffers()
        return model.to(device)

    def load_weights(self, state: dict[str, Tensor], assign: bool = False) -> None:
        """load_state_dict that accepts a missing tied lm_head and explains a mismatch."""
        state = dict(state)
        tied = self.config.tie_embeddings
        if tied:
            state.pop("lm_head.weight", None)
        own = self.state_dict()
        expected = set(own) - ({"lm_head.weight"} if tied else set())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        bad = [k for k in set(state) & expected if state[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise UserError(f"weights do not match the config: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}, wrong shape {sorted(bad)[:3]}: check that "
                            "config.json belongs to these weights")
        self.load_state_dict(state, strict=False, assign=assign)
        if tied:
            self.lm_head.weight = self.tok_emb.weight  # assign=True replaced the shared tensor


def load_seq2seq_config(path: str | os.PathLike) -> Seq2SeqConfig:
    """The Seq2SeqConfig in `path`/config.json, or a UserError saying what the file is."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    data = read_json_object(file, "point at a seq2seq checkpoint (scratchllm train-seq2seq)")
    if data.get("kind") != KIND:
        raise UserError(f"{file} is not an encoder-decoder checkpoint: train one with "
                        "`scratchllm train-seq2seq` (GPT checkpoints work with generate)")
    return Seq2SeqConfig.from_dict(data)


def pad_rows(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor]:
    """Right-padded ids (B, L) and their mask (B, L), True = real token."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return ids.to(device), mask.to(device)


def smoothed_loss_sum(logits: Tensor, targets: Tensor, smoothing: float,
                      ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Label-smoothed fp32 cross-entropy summed over real targets, and their count.

    (1 - e) * nll + e * (mean over the vocabulary of -log p): the same as torch's
    cross_entropy(label_smoothing=e); e = 0 is the plain loss (the memory-lean kernel).
    """
    if smoothing == 0:
        return lm_loss_sum(logits, targets, ignore_index)
    logp = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)  # (N, V)
    flat = targets.reshape(-1)
    valid = flat != ignore_index
    nll = -logp.gather(1, torch.where(valid, flat, 0)[:, None]).squeeze(1)  # (N,)
    uniform = -logp.mean(dim=-1)  # cross-entropy against the uniform distribution
    loss = ((1.0 - smoothing) * nll + smoothing * uniform) * valid
    return loss.sum(), valid.sum()


class DecodeState:
    """Decoding B target rows against encoded sources: the window protocol beam search uses
    (prefill, append, next_logits, reorder), as generate.engine.Window for the GPT.

    The encoder runs once per source and its output's cross-attention keys/values once per
    layer (cache_cross=False recomputes them every step: the slow reference). The decoder's own
    keys/values go to a KV cache of max_new_tokens slots (use_cache=False re-runs the whole
    target prefix each step instead).
    """

    def __init__(self, model: Seq2Seq, src: Tensor, src_mask: Tensor, max_new_tokens: int,
                 copies: int = 1, use_cache: bool = True, cache_cross: bool = True) -> None:
        self.model, self.use_cache, self.cache_cross = model, use_cache, cache_cross
        cfg = model.config
        memory = model.encode(src, src_mask)  # (n_src, S, C), each source once
        if copies > 1:  # beams: every source's rows side by side
            memory = memory.repeat_interleave(copies, dim=0)
            src_mask = src_mask.repeat_interleave(copies, dim=0)
        self.memory, self.src_mask = memory, src_mask
        self.kv = model.memory_kv(memory) if cache_cross else None
        B = memory.shape[0]
        # Slot j of the target holds position j: bos, then generated tokens (the last of
        # max_new_tokens is never fed back).
        self.slots = max(1, min(max_new_tokens, cfg.context_length))
        self.tokens = torch.full((B, self.slots + 1), cfg.pad_id, dtype=torch.long,
                                 device=memory.device)
        self.tokens[:, 0] = cfg.bos_id
        self.n = 1  # columns written
        self.positions = model.arange[:self.slots]
        self.caches = model.make_cache(B, self.slots) if use_cache else None

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def _memory_kv(self) -> list[tuple[Tensor, Tensor]]:
        return self.kv if self.kv is not None else self.model.memory_kv(self.memory)

    def _step(self) -> Tensor:
        """Logits (B, V) for the token after column n - 1."""
        model, n = self.model, self.n
        if self.caches is None:  # the whole prefix again (no KV cache)
            logits = model.decode(self.tokens[:, :n], self._memory_kv(), self.src_mask)
        else:
            logits = model.decode(self.tokens[:, n - 1:n], self._memory_kv(), self.src_mask,
                                  cache=self.caches, input_pos=self.positions[n - 1:n])
        return logits[:, -1]

    def prefill(self) -> Tensor:
        """Logits (B, V) for the first target token (after bos)."""
        return self._step()

    def append(self, tokens: Tensor) -> None:
        """Write one new token per row, tokens (B,)."""
        self.tokens[:, self.n] = tokens
        self.n += 1

    def next_logits(self) -> Tensor | None:
        """Logits (B, V) for the next token, or None when every slot is used."""
        if self.n > self.slots:
            return None
        return self._step()

    def reorder(self, rows: Tensor) -> None:
        """Keep rows (beams) in the given order: tokens, source rows and cached keys/values."""
        self.tokens = self.tokens[rows]
        self.memory, self.src_mask = self.memory[rows], self.src_mask[rows]
        if self.kv is not None:
            self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        for cache in self.caches or ():
            cache.k.copy_(cache.k[rows])
            cache.v.copy_(cache.v[rows])


@torch.inference_mode()
def greedy_decode(model: Seq2Seq, sources: list[list[int]], max_new_tokens: int | list[int],
                  use_cache: bool = True, cache_cross: bool = True) -> list[list[int]]:
    """The greedy (argmax) target ids of a batch of sources (eos excluded); max_new_tokens may
    differ per source (e.g. relative to its length). Every row stops at eos on its own."""
    limits = ([max_new_tokens] * len(sources) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    was_training = model.training
    model.eval()
    try:
        state = model.start_decoding(sources, max(limits), use_cache=use_cache,
                                     cache_cross=cache_cross)
        eos, out = model.config.eos_id, [[] for _ in sources]
        live = [limit > 0 for limit in limits]
        logits = state.prefill() if any(live) else None
        while logits is not None and any(live):
            tokens = logits.argmax(-1)
            state.append(tokens)
            for i, token in enumerate(tokens.tolist()):
                if not live[i]:
                    continue
                if token == eos:
                    live[i] = False
                    continue
                out[i].append(token)
                live[i] = len(out[i]) < limits[i]
            logits = state.next_logits() if any(live) else None
        return out
    finally:
        model.train(was_training)
