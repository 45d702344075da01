"""Everything a run needs before its first step: device, seeds, data, model, wrappers."""

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from scratchllm.config import DataConfig, RunConfig, TrainConfig
from scratchllm.errors import UserError
from scratchllm.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but CUDA is not available: use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from the config."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_dtype(device: torch.device, dtype: str) -> str:
    """'auto': bfloat16 where the hardware multiplies bf16 natively (CUDA with bf16, CPUs
    with AMX or AVX512-BF16), else float32 (bf16 would only add conversions there)."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        from scratchllm.model.layers import _cpu_has_fast_bf16

        return "bfloat16" if _cpu_has_fast_bf16() else "float32"
    return "float32"


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast for the forward pass, or nothing in float32."""
    dtype = resolve_dtype(device, dtype)
    if dtype not in DTYPES:
        raise UserError(f"unknown train.dtype {dtype!r}: choose auto or one of "
                        f"{', '.join(DTYPES)}")
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise UserError("train.dtype float16 needs CUDA (it needs a grad scaler); use bfloat16")
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def peak_flops(device: torch.device, dtype: str) -> float:
    """A guess of the hardware's peak FLOP/s for MFU (0 when unknown)."""
    low_precision = dtype in ("bfloat16", "float16")
    if device.type == "cpu":
        # Measured matmul peaks of our 2-core AMX dev machine; set train.peak_flops for yours.
        return 1.2e12 if low_precision else 3.0e11
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16, fp32 in (("H200", 989e12, 67e12), ("H100", 989e12, 67e12),
                                ("A100", 312e12, 19.5e12), ("L4", 121e12, 30e12),
                                ("4090", 165e12, 82e12)):
            if key in name:
                return bf16 if low_precision else fp32
    return 0.0


def ensure_data(cfg: DataConfig, run_dir: Path, progress: bool, log):
    """(tokenizer, shards dir): train the tokenizer and prepare the shards if needed."""
    from scratchllm.data.prepare import PrepareOptions, prepare, read_meta
    from scratchllm.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

    if cfg.shards:
        meta = read_meta(cfg.shards)
        path = Path(meta["tokenizer"]["path"])
        if not path.is_file():
            raise UserError(f"the tokenizer {path} that made {cfg.shards} is gone; set "
                            "data.tokenizer to it or re-run `scratchllm prepare`")
        return load_tokenizer(path), Path(cfg.shards)
    if cfg.tokenizer in ("bpe", "char"):
        path = run_dir / "tokenizer.json"
        if not path.is_file():
            from scratchllm.data import texts_from_source

            log(f"training a {cfg.tokenizer} tokenizer on {cfg.source}")
            texts = list(texts_from_source(cfg.source))
            tok = (CharTokenizer.train(texts) if cfg.tokenizer == "char" else
                   Tokenizer.train(texts, cfg.vocab_size, progress=progress))
            tok.save(path)
    else:
        path = Path(cfg.tokenizer)
    shards = run_dir / "data"
    meta = prepare([cfg.source], path, shards, PrepareOptions(val_fraction=cfg.val_fraction),
                   progress=progress)
    if not meta["up_to_date"]:
        log(f"prepared {cfg.source}: {meta['splits']['train']['tokens']:,} train and "
            f"{meta['splits']['val']['tokens']:,} val tokens")
    return load_tokenizer(path), shards


def init_model(cfg: RunConfig, vocab_size: int, log) -> GPT:
    """A fresh GPT from [model], or the weights of train.init_from (continued pretraining)."""
    source = cfg.train.init_from
    if not source:
        return GPT(cfg.model_config(vocab_size))
    path = Path(source)
    config_file = path / "config.json"
    if config_file.is_file() and "model_type" in json.loads(config_file.read_text()):
        from scratchllm.model.convert import from_hf

        model = from_hf(path)
    else:
        from scratchllm.train.checkpoint import find_checkpoint

        model = GPT.from_pretrained(find_checkpoint(path))
    if model.config.vocab_size != vocab_size:
        raise UserError(f"train.init_from {source} has a vocabulary of "
                        f"{model.config.vocab_size}, the tokenizer {vocab_size}: use the "
                        "tokenizer the model was trained with (data.tokenizer)")
    log(f"initialised from {source} ({model.num_params():,} parameters); [model] is ignored")
    return model.train()


def prepare_model(model: GPT, cfg: TrainConfig) -> torch.nn.Module:
    """Apply activation checkpointing, then compile, from outside the model.

    Both keep parameter names unchanged: checkpointing wraps each block's forward on the
    instance, and compile is in place (`module.compile()`), so state_dict keys stay clean.
    """
    if cfg.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for block in model.blocks:
            forward = block.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = checkpointed
    if cfg.compile:
        model.compile()
    return model
