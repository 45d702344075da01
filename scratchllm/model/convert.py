"""Hugging Face interop: import GPT-2 / LLaMA checkpoints, export to the same two formats.

The mapping is by name and shape only; transformers is needed only to pass in a model object.
Weights are read from safetensors only: pickle files (pytorch_model.bin) are refused unread.
GPT-2 stores its projections as Conv1D, (in, out): those are transposed, and its fused c_attn
is split into our separate q/k/v projections (and fused back on export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_bytes, atomic_write_text, read_json_object
from scratchllm.model.config import GELU_MLPS, GPTConfig
from scratchllm.model.gpt import GPT

# HF's activation_function names -> our mlp: gelu_new and gelu_pytorch_tanh are GELU's tanh
# approximation, "gelu" the exact (erf) form.
GPT2_ACTS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


# ---- reading a checkpoint ------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    """The config.json of a saved HF model directory."""
    return read_json_object(path / "config.json", "point at a Hugging Face model directory")


# Files that hold pickles, which can run any code when loaded: never opened, only named.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a saved HF model directory (checked to exist, not read)."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if index.is_file():  # sharded: the index maps every tensor to its shard
        weight_map = read_json_object(index, "re-download the checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map: re-download the checkpoint")
        files = sorted({path / str(f) for f in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise UserError(f"{file} (a shard {index.name} names) not found: re-download "
                                "the checkpoint")
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{path / pickles[0]} is a pickle file, which scratchllm never loads "
                        "(unpickling can run code): re-save the model as safetensors, e.g. "
                        "model.save_pretrained(dir, safe_serialization=True) in transformers")
    raise UserError(f"no model.safetensors (or model.safetensors.index.json) in {path}: "
                    "point at a Hugging Face model directory")


def _read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of a saved HF model directory (model.safetensors, sharded or not)."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in weight_files(path):
        try:
            state.update(load_file(file))
        except Exception as e:  # safetensors has its own error types for corrupt files
            detail = " ".join(str(e).split())
            raise UserError(f"{file} is not a readable safetensors file ({detail}): "
                            "re-download or re-save it") from e
    return state


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise UserError(f"unsupported Hugging Face checkpoint: {what}")


# ---- GPT-2 ---------------------------------------------------------------------------------


def _gpt2_config(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    _need(act in GPT2_ACTS, f"activation {act!r} (only {', '.join(GPT2_ACTS)})")
    _need(hf.get("scale_attn_weights", True), "scale_attn_weights=False")
    _need(not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
    _need(not hf.get("add_cross_attention", False), "cross-attention layers")
    d = hf.get("n_embd", 768)
    return dict(vocab_size=hf.get("vocab_size", 50257), context_length=hf.get("n_positions", 1024),
                n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=d,
                mlp_hidden=hf.get("n_inner") or 4 * d, embd_dropout=hf.get("embd_pdrop", 0.1),
                attn_dropout=hf.get("attn_pdrop", 0.1), resid_dropout=hf.get("resid_pdrop", 0.1),
                bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                pos_encoding="learned", norm="layernorm", mlp=GPT2_ACTS[act],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                init_std=hf.get("initializer_range", 0.02))


def _gpt2_state(hf: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    src = {k.removeprefix("transformer."): v for k, v in hf.items()
           if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
    out = {"tok_emb.weight": src.pop("wte.weight"), "pos_emb.weight": src.pop("wpe.weight"),
           "norm_f.weight": src.pop("ln_f.weight"), "norm_f.bias": src.pop("ln_f.bias")}
    if "lm_head.weight" in src:
        out["lm_head.weight"] = src.pop("lm_head.weight")
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{b}{ours}.weight"] = src.pop(f"{h}{theirs}.weight")
            out[f"{b}{ours}.bias"] = src.pop(f"{h}{theirs}.bias")
        # Conv1D weights are (in, out); nn.Linear wants (out, in).
        qkv_w = src.pop(f"{h}attn.c_attn.weight").t()  # (3C, C)
        qkv_b = src.pop(f"{h}attn.c_attn.bias")
        for name, w, bias in zip("qkv", qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            out[f"{b}attn.{name}_proj.weight"], out[f"{b}attn.{name}_proj.bias"] = w, bias
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            out[f"{b}{ours}.weight"] = src.pop(f"{h}{theirs}.weight").t()
            out[f"{b}{ours}.bias"] = src.pop(f"{h}{theirs}.bias")
    _need(not src, f"unexpected GPT-2 weights {sorted(src)[:3]}")
    return out


def _to_gpt2(model: GPT) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg = model.config
    # GPT-2 always has biases; a bias-free model exports exact zeros.
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def bias(key: str, n: int) -> Tensor:
        return sd[key] if key in sd else torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)

    d = cfg.n_embd
    out = {"transformer.wte.weight": sd["tok_emb.weight"],
           "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"],
           "transformer.ln_f.bias": bias("norm_f.bias", d)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", d)
        out[f"{h}attn.c_attn.weight"] = torch.cat(
            [sd[f"{b}attn.{n}_proj.weight"] for n in "qkv"]).t()  # (C, 3C)
        out[f"{h}attn.c_attn.bias"] = torch.cat([bias(f"{b}attn.{n}_proj.bias", d) for n in "qkv"])
        for ours, theirs, n in (("attn.o_proj", "attn.c_proj", d),
                                ("mlp.up_proj", "mlp.c_fc", cfg.mlp_hidden),
                                ("mlp.down_proj", "mlp.c_proj", d)):
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"].t()
            out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", n)
    eos = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if it exists
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                  vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=d,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                  activation_function="gelu_new" if cfg.mlp == "gelu" else "gelu",
                  resid_pdrop=cfg.resid_dropout, embd_pdrop=cfg.embd_dropout,
                  attn_pdrop=cfg.attn_dropout,
                  layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
                  scale_attn_weights=True, tie_word_embeddings=cfg.tie_embeddings,
                  bos_token_id=eos, eos_token_id=eos, use_cache=True)
    return config, out


# ---- LLaMA ---------------------------------------------------------------------------------


def _llama_config(hf: dict[str, Any]) -> dict[str, Any]:
    d, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _need(rope_type == "default", f"rope_type {rope_type!r} (only plain RoPE)")
    _need(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}")
    _need(hf.get("head_dim") in (None, d // n_head), "head_dim != hidden_size/num_heads")
    _need(hf.get("attention_bias", False) == hf.get("mlp_bias", False),
          "attention_bias != mlp_bias")
    _need(hf.get("pretraining_tp", 1) in (None, 1), "pretraining_tp > 1")
    return dict(vocab_size=hf.get("vocab_size", 32000),
                context_length=hf.get("max_position_embeddings", 2048),
                n_layer=hf.get("num_hidden_layers", 32), n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=d,
                mlp_hidden=hf.get("intermediate_size", 11008),
                attn_dropout=float(hf.get("attention_dropout", 0.0)),
                bias=hf.get("attention_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False), pos_encoding="rope",
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                init_std=hf.get("initializer_range", 0.02))


# (ours inside blocks.i, theirs inside model.layers.i)
_LLAMA_LAYER = [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                *((f"attn.{n}_proj", f"self_attn.{n}_proj") for n in "qkvo"),
                *((f"mlp.{n}_proj", f"mlp.{n}_proj") for n in ("gate", "up", "down"))]


def _llama_names(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(our key, HF key) for every tensor of a LLaMA-style model."""
    names = [("tok_emb.weight", "model.embed_tokens.weight"),
             ("norm_f.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        for ours, theirs in _LLAMA_LAYER:
            params = ("weight", "bias") if cfg.bias and not ours.startswith("norm") else ("weight",)
            names += [(f"blocks.{i}.{ours}.{p}", f"model.layers.{i}.{theirs}.{p}") for p in params]
    return names


def _llama_state(hf: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    src = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {ours: src.pop(theirs) for ours, theirs in _llama_names(cfg)}
    if cfg.tie_embeddings:
        src.pop("lm_head.weight", None)
    _need(not src, f"unexpected LLaMA weights {sorted(src)[:3]}")
    return out


def _to_llama(model: GPT) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg = model.config
    sd = model.state_dict()
    out = {theirs: sd[ours].detach() for ours, theirs in _llama_names(cfg)}
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama",
                  vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
                  hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, hidden_act="silu",
                  rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias,
                  mlp_bias=cfg.bias, attention_dropout=cfg.attn_dropout,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  rope_theta=cfg.rope_theta,  # for transformers < 5
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True)
    return config, out


# ---- public API ----------------------------------------------------------------------------

_CONFIGS = {"gpt2": _gpt2_config, "llama": _llama_config}  # model_type -> GPTConfig fields


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of an HF model directory, checked: a supported model_type and
    safetensors weights present (not read yet), so bad input fails before any heavy work."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: pass a saved Hugging Face model "
                        "directory or a transformers model object")
    config = _read_config(path)
    _check_model_type(config)
    GPTConfig.from_dict(_CONFIGS[config["model_type"]](config))  # unsupported features
    weight_files(path)
    return config


def _check_model_type(config: dict[str, Any]) -> None:
    kind = config.get("model_type")
    if kind not in _CONFIGS:
        raise UserError(f"model_type {kind!r} is not supported: import 'gpt2' or 'llama'")



def from_hf(source: Any, **overrides: Any) -> GPT:
    """A GPT from a transformers GPT-2 / LLaMA model object or a saved HF directory.

    overrides replace GPTConfig fields (e.g. attention="explicit", embd_dropout=0.0).
    """
    if isinstance(source, torch.nn.Module):
        config, path = source.config.to_dict(), None
        _check_model_type(config)
    else:
        path = Path(source)
        config = read_hf_config(path)
    kind = config["model_type"]
    to_state = _gpt2_state if kind == "gpt2" else _llama_state
    cfg = GPTConfig.from_dict({**_CONFIGS[kind](config), **overrides})
    state = source.state_dict() if path is None else _read_weights(path)
    try:
        ours = to_state(state, cfg)
    except KeyError as e:  # a weight the config implies is absent
        where = "the model" if path is None else str(path)
        raise UserError(f"weight {e} is missing from {where}: check that config.json belongs "
                        "to these weights") from None
    with torch.device("meta"):
        model = GPT(cfg)
    ours = {k: v.detach().to(torch.float32).contiguous() for k, v in ours.items()}
    model.load_weights(ours, assign=True)
    model.init_buffers()
    return model.eval()


def to_hf(model: GPT, out_dir: str | os.PathLike,
          extra_config: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + config.json that transformers' AutoModelForCausalLM loads.

    extra_config: entries that replace config.json's (e.g. eos_token_id from the tokenizer).
    """
    from safetensors.torch import save

    cfg = model.config
    if (cfg.pos_encoding, cfg.norm) == ("learned", "layernorm") and cfg.mlp in GELU_MLPS:
        if cfg.n_kv_head != cfg.n_head:
            raise UserError("GPT-2 has no grouped-query attention: export needs n_kv_head = "
                            "n_head")
        config, state = _to_gpt2(model)
    elif (cfg.pos_encoding, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        config, state = _to_llama(model)
    else:
        raise UserError(f"no Hugging Face architecture matches pos_encoding={cfg.pos_encoding}, "
                        f"norm={cfg.norm}, mlp={cfg.mlp}: export supports GPT-2 style (learned, "
                        "layernorm, gelu or gelu_exact) or LLaMA style (rope, rmsnorm, swiglu)")
    out = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = dtype
    config.update(extra_config or {})
    atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out
