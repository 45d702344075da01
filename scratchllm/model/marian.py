"""Hugging Face interop for the encoder-decoder: MarianMTModel weights in and out.

Marian (OPUS-MT) is the paper's post-norm transformer with scaled embeddings, sinusoids in
fairseq's split layout, one embedding shared by encoder, decoder and output, and a bias on the
logits (final_logits_bias): a Seq2SeqConfig expresses all of it, so the mapping is by name
only. As in convert.py, weights are read from safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_bytes, atomic_write_text
from scratchllm.model.convert import _need, _read_config, _read_weights, weight_files
from scratchllm.model.seq2seq import Seq2Seq, Seq2SeqConfig

# transformers' activation names -> ours (gelu_new and gelu_pytorch_tanh are both tanh GELU)
_ACTS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu",
         "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_OUR_ACTS = {"relu": "relu", "gelu": "gelu", "silu": "swish", "gelu_tanh": "gelu_new"}

# (ours, theirs) inside encoder_blocks.i / model.encoder.layers.i
_ENCODER = [("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"),
            *((f"attn.{n}_proj", f"self_attn.{n}_proj") for n in "qkv"),
            ("attn.o_proj", "self_attn.out_proj"), ("mlp.up_proj", "fc1"),
            ("mlp.down_proj", "fc2")]
# ... and inside decoder_blocks.i / model.decoder.layers.i
_DECODER = [("norm1", "self_attn_layer_norm"), ("norm2", "encoder_attn_layer_norm"),
            ("norm3", "final_layer_norm"),
            *((f"self_attn.{n}_proj", f"self_attn.{n}_proj") for n in "qkv"),
            ("self_attn.o_proj", "self_attn.out_proj"),
            *((f"cross_attn.{n}_proj", f"encoder_attn.{n}_proj") for n in "qkv"),
            ("cross_attn.o_proj", "encoder_attn.out_proj"), ("mlp.up_proj", "fc1"),
            ("mlp.down_proj", "fc2")]


def marian_config(hf: dict[str, Any], output_bias: bool = True) -> Seq2SeqConfig:
    """The Seq2SeqConfig of a MarianConfig dict (unsupported features are a UserError)."""
    _need(hf.get("model_type") == "marian", f"model_type {hf.get('model_type')!r} (only marian)")
    act = hf.get("activation_function", "gelu")
    _need(act in _ACTS, f"activation {act!r}")
    _need(hf.get("share_encoder_decoder_embeddings", True), "separate decoder embeddings")
    vocab = hf.get("vocab_size", 58101)
    _need(hf.get("decoder_vocab_size") in (None, vocab), "a decoder vocabulary of its own")
    heads = hf.get("encoder_attention_heads", 16)
    _need(hf.get("decoder_attention_heads", heads) == heads, "different head counts")
    ffn = hf.get("encoder_ffn_dim", 4096)
    _need(hf.get("decoder_ffn_dim", ffn) == ffn, "different FFN widths")
    _need(not hf.get("activation_dropout"), "activation_dropout > 0")
    dropout = float(hf.get("dropout", 0.1))
    pad = hf.get("pad_token_id", 58100)
    eos = hf.get("eos_token_id", 0)
    start = hf.get("decoder_start_token_id")
    return Seq2SeqConfig(
        vocab_size=vocab, context_length=hf.get("max_position_embeddings", 1024),
        n_encoder_layer=hf.get("encoder_layers", 12), n_decoder_layer=hf.get("decoder_layers", 12),
        n_head=heads, n_embd=hf.get("d_model", 1024), mlp_hidden=ffn, activation=_ACTS[act],
        embd_dropout=dropout, resid_dropout=dropout,
        attn_dropout=float(hf.get("attention_dropout", 0.0)), bias=True, norm="layernorm",
        norm_eps=1e-5, norm_position="post", pos_encoding="sinusoidal", sinusoid_layout="split",
        scale_embeddings=bool(hf.get("scale_embedding", False)),
        tie_embeddings=hf.get("tie_word_embeddings", True), output_bias=output_bias,
        label_smoothing=0.0, pad_id=pad, bos_id=pad if start is None else start,
        eos_id=eos[0] if isinstance(eos, list) else eos)


def _names(cfg: Seq2SeqConfig) -> list[tuple[str, str]]:
    """(our key, HF key) for every tensor but the embeddings and the logit bias."""
    names = []
    for i in range(cfg.n_encoder_layer):
        for ours, theirs in _ENCODER:
            names += [(f"encoder_blocks.{i}.{ours}.{p}", f"model.encoder.layers.{i}.{theirs}.{p}")
                      for p in ("weight", "bias")]
    for i in range(cfg.n_decoder_layer):
        for ours, theirs in _DECODER:
            names += [(f"decoder_blocks.{i}.{ours}.{p}", f"model.decoder.layers.{i}.{theirs}.{p}")
                      for p in ("weight", "bias")]
    return names


def _from_marian_state(hf: dict[str, Tensor], cfg: Seq2SeqConfig) -> dict[str, Tensor]:
    src = {k: v for k, v in hf.items() if not k.endswith("embed_positions.weight")}
    out = {ours: src.pop(theirs) for ours, theirs in _names(cfg)}
    shared = src.pop("model.shared.weight", None)
    for key in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        value = src.pop(key, None)
        shared = value if shared is None else shared
    if shared is None:
        raise KeyError("model.shared.weight")
    out["tok_emb.weight"] = shared
    head = src.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise KeyError("lm_head.weight")
        out["lm_head.weight"] = head
    bias = src.pop("final_logits_bias", None)
    if cfg.output_bias:
        out["lm_head.bias"] = (bias.reshape(-1) if bias is not None
                               else torch.zeros(cfg.vocab_size))
    _need(not src, f"unexpected Marian weights {sorted(src)[:3]}")
    return out


def from_hf(source: Any, **overrides: Any) -> Seq2Seq:
    """A Seq2Seq from a transformers MarianMTModel object or a saved Marian directory.

    The logit bias is kept only where it is non-zero (a freshly built Marian has zeros).
    overrides replace Seq2SeqConfig fields (e.g. attention="explicit", resid_dropout=0.0).
    """
    if isinstance(source, torch.nn.Module):
        config, path = source.config.to_dict(), None
        state = source.state_dict()
    else:
        path = Path(source)
        if not path.is_dir():
            raise UserError(f"{path} is not a directory: pass a saved MarianMTModel directory "
                            "or a transformers model object")
        config = _read_config(path)
        marian_config(config)  # unsupported features fail before the weights are read
        weight_files(path)
        state = _read_weights(path)
    bias = state.get("final_logits_bias")
    cfg = marian_config(config, output_bias=bias is not None and bool(bias.any()))
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    try:
        ours = _from_marian_state(state, cfg)
    except KeyError as e:
        where = "the model" if path is None else str(path)
        raise UserError(f"weight {e} is missing from {where}: check that config.json belongs "
                        "to these weights") from None
    with torch.device("meta"):
        model = Seq2Seq(cfg)
    model.load_weights({k: v.detach().float().contiguous() for k, v in ours.items()},
                       assign=True)
    model.init_buffers()
    return model.eval()


def to_hf(model: Seq2Seq, out_dir: str | os.PathLike) -> Path:
    """Write model.safetensors + config.json that transformers' MarianMTModel loads."""
    from safetensors.torch import save

    cfg = model.config
    layout = (cfg.norm_position, cfg.pos_encoding, cfg.sinusoid_layout, cfg.norm, cfg.bias,
              cfg.n_kv_head == cfg.n_head)
    if layout != ("post", "sinusoidal", "split", "layernorm", True, True):
        raise UserError("Marian is post-norm with split sinusoids, LayerNorm, biases and "
                        "multi-head attention: export needs norm_position=post, "
                        "pos_encoding=sinusoidal, sinusoid_layout=split, norm=layernorm, "
                        "bias=true and n_kv_head = n_head")
    if cfg.embd_dropout != cfg.resid_dropout:
        raise UserError("Marian has one dropout rate: export needs embd_dropout = resid_dropout")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {theirs: sd[ours] for ours, theirs in _names(cfg)}
    out["model.shared.weight"] = sd["tok_emb.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    bias = sd.get("lm_head.bias")
    out["final_logits_bias"] = (bias if bias is not None
                                else torch.zeros(cfg.vocab_size, dtype=sd["tok_emb.weight"].dtype)
                                )[None]
    config = dict(architectures=["MarianMTModel"], model_type="marian",
                  vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size,
                  max_position_embeddings=cfg.context_length, d_model=cfg.n_embd,
                  encoder_layers=cfg.n_encoder_layer, decoder_layers=cfg.n_decoder_layer,
                  encoder_attention_heads=cfg.n_head, decoder_attention_heads=cfg.n_head,
                  encoder_ffn_dim=cfg.mlp_hidden, decoder_ffn_dim=cfg.mlp_hidden,
                  activation_function=_OUR_ACTS[cfg.activation], dropout=cfg.resid_dropout,
                  attention_dropout=cfg.attn_dropout, activation_dropout=0.0,
                  scale_embedding=cfg.scale_embeddings, share_encoder_decoder_embeddings=True,
                  tie_word_embeddings=cfg.tie_embeddings, pad_token_id=cfg.pad_id,
                  decoder_start_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
                  forced_eos_token_id=cfg.eos_id, is_encoder_decoder=True, use_cache=True)
    target = Path(out_dir)
    state = {k: v.contiguous() for k, v in out.items()}
    config["dtype"] = config["torch_dtype"] = str(sd["tok_emb.weight"].dtype).removeprefix(
        "torch.")
    atomic_write_bytes(target / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_text(target / "config.json", json.dumps(config, indent=2) + "\n")
    return target
