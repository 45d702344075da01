"""The pretraining recipe: a tokenizer and token shards, a GPT, next-token loss, val metrics.

`pretrainer(config, run_dir)` returns the shared TrainLoop with this recipe; `run()` trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from scratchllm.config import Sections, check_choice, check_range
from scratchllm.data.loader import RandomWindows, SequentialWindows, load_tokens
from scratchllm.distributed.config import ParallelConfig
from scratchllm.errors import UserError
from scratchllm.fileio import read_json_object
from scratchllm.model import GPT, GPTConfig, lm_loss_sum
from scratchllm.model.flops import flops_per_token
from scratchllm.runtime import autocast
from scratchllm.train.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig
from scratchllm.train.loop import Recipe, TrainLoop


@dataclass
class DataConfig:
    """What to train on and how to tokenize it."""

    # Any `scratchllm prepare` sources, read and tokenized together as one corpus: a TOML list
    # (["shakespeare", "gutenberg"]) or, on the command line, --data.source=shakespeare,gutenberg.
    source: list[str] = field(default_factory=lambda: ["shakespeare"])
    tokenizer: str = "bpe"  # "bpe" or "char" (trained on source), or a tokenizer JSON path
    vocab_size: int = 4096  # for tokenizer = "bpe"
    shards: str = ""  # an already-prepared directory; default RUN_DIR/data
    val_fraction: float = 0.1
    loader: str = "random"  # random (nanoGPT-style windows) | sequential (epochs)

    def check(self) -> None:
        """Ranges and names, checked when the config is loaded (before any work)."""
        if isinstance(self.source, str):  # set from Python: one source, or a comma list
            self.source = [s.strip() for s in self.source.split(",") if s.strip()]
        if not self.source:
            raise UserError("data.source is empty: name a corpus, e.g. shakespeare, or several "
                            'as a list: ["shakespeare", "gutenberg"]')
        check_range("data.vocab_size", self.vocab_size, 1)
        check_range("data.val_fraction", self.val_fraction, 0, 1)
        check_choice("data.loader", self.loader, ("random", "sequential"))


MODEL_KEYS = ["preset", *(f.name for f in fields(GPTConfig))]


@dataclass
class PretrainConfig(Sections):
    """A whole pretraining run: [data], [model] (a preset plus any GPTConfig field), and the
    loop's [train], [optim], [eval], [checkpoint]."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "nano"},
                                  metadata={"keys": MODEL_KEYS})
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def check(self) -> None:
        """The [model] section must make a valid GPTConfig (checked with data.vocab_size)."""
        self.model_config(self.data.vocab_size)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of [model] with the tokenizer's vocab_size."""
        spec = dict(self.model)
        preset = spec.pop("preset", None)
        spec["vocab_size"] = vocab_size
        return GPTConfig.preset(preset, **spec) if preset else GPTConfig.from_dict(spec)


def pretrainer(config: PretrainConfig, run_dir: str | Path, resume: str | None = None,
               progress: bool = True, log=print) -> TrainLoop:
    """The training loop with the pretraining recipe (call .run() to train)."""
    return TrainLoop(config, run_dir, build_pretraining, resume=resume, progress=progress,
                     log=log, name="pretraining")


def build_pretraining(loop: TrainLoop) -> Recipe:
    """Tokenizer and shards (made if needed), the model, the loaders, loss and evaluation."""
    cfg = loop.config
    if not loop.layout.is_main:  # rank 0 trains the tokenizer and prepares the shards first
        loop.layout.barrier()
    tokenizer, shards = ensure_data(cfg.data, loop.run_dir, loop.progress, loop.log)
    if loop.layout.is_main:
        loop.layout.barrier()
    model = init_model(cfg, tokenizer.vocab_size, loop.log)
    T = model.config.context_length
    train_tokens = load_tokens(shards, "train", tokenizer)
    val_tokens = load_tokens(shards, "val", tokenizer)
    check_before_training(cfg, tokenizer, T, shards, train_tokens, val_tokens)
    loader_cls = {"random": RandomWindows, "sequential": SequentialWindows}.get(cfg.data.loader)
    if loader_cls is None:
        raise UserError(f"unknown data.loader {cfg.data.loader!r}: random or sequential")
    layout = loop.layout  # each data-parallel rank reads its own windows
    batches = loader_cls(train_tokens, cfg.train.batch_size, T, seed=cfg.train.seed,
                         rank=layout.data_rank, world_size=layout.data_size)
    evaluation = Evaluation(val_tokens, tokenizer, cfg, T)
    return Recipe(model=model, batches=batches, loss=next_token_loss, tokenizer=tokenizer,
                  accumulation=accumulation_steps(cfg.train, T, layout.data_size),
                  evaluate=evaluation, flops_per_token=flops_per_token(model.config, T))


def check_before_training(cfg: PretrainConfig, tokenizer, T: int, shards: Path,
                          train_tokens: np.ndarray, val_tokens: np.ndarray) -> None:
    """What the first and last evaluations need, checked before step 1 (not after a run)."""
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < T + 1:
            raise UserError(f"the {split} split of {shards} has {len(tokens)} tokens, fewer than "
                            f"context_length + 1 = {T + 1}: use a shorter model.context_length, "
                            "more data, or a larger data.val_fraction")
    if cfg.eval.sample_tokens > 0:
        n = len(tokenizer.encode(cfg.eval.prompt, allowed_special="all"))
        if n > T:
            raise UserError(f"eval.prompt is {n} tokens, longer than the context ({T}): "
                            "shorten it")


def next_token_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Summed fp32 cross-entropy of the model's next-token logits (targets already shifted)."""
    x, y = batch
    return lm_loss_sum(model(x), y)[0]


class Evaluation:
    """Val loss, perplexity and bits per byte on fixed val windows, plus a sample."""

    def __init__(self, val_tokens: np.ndarray, tokenizer, cfg: PretrainConfig, T: int):
        self.val_tokens, self.tokenizer, self.cfg, self.T = val_tokens, tokenizer, cfg, T
        self.token_bytes = token_byte_lengths(tokenizer)

    def __call__(self, loop: TrainLoop) -> dict[str, Any]:
        cfg = self.cfg
        # The same val windows every time (their own seed), so evaluations compare.
        windows = RandomWindows(self.val_tokens, cfg.train.batch_size, self.T, seed=0)
        nats, targets, n_bytes = 0.0, 0, 0
        for _ in range(cfg.eval.batches):
            x, y = windows.next_batch()
            with autocast(loop.device, cfg.train.dtype):
                logits = loop.train_model(x.to(loop.device))
            loss_sum, count = lm_loss_sum(logits, y.to(loop.device))
            nats += float(loss_sum)
            targets += int(count)
            n_bytes += int(self.token_bytes[y.numpy()].sum())
        val_loss = nats / max(targets, 1)
        record = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "val_bpb": nats / math.log(2) / max(n_bytes, 1)}
        loop.say(f"step {loop.step}: val loss {val_loss:.4f}, ppl {record['val_ppl']:.2f}, "
                 f"{record['val_bpb']:.3f} bits/byte")
        if cfg.eval.sample_tokens > 0 and loop.layout.can_generate:
            record["sample"] = sample(loop.model, self.tokenizer, cfg.eval.prompt,
                                      cfg.eval.sample_tokens, cfg.eval.temperature,
                                      cfg.eval.top_k or None)
            loop.say(f"sample: {record['sample']!r}")
        return record


def sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
           top_k: int | None, seed: int = 0) -> str:
    """A sample from the model (its own RNG: training randomness is untouched)."""
    from scratchllm.generate import generate

    ids = tokenizer.encode(prompt, allowed_special="all")
    new = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, seed=seed)
    return prompt + tokenizer.decode(new)


def ensure_data(cfg: DataConfig, run_dir: Path, progress: bool, log):
    """(tokenizer, shards dir): train the tokenizer and prepare the shards if needed."""
    from scratchllm.data.prepare import PrepareOptions, prepare
    from scratchllm.data.shards import shard_tokenizer_path
    from scratchllm.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

    trained_here = cfg.tokenizer in ("bpe", "char")
    if cfg.shards:  # an explicit data.tokenizer wins over the one the shards were made with
        path = Path(cfg.tokenizer) if not trained_here else shard_tokenizer_path(cfg.shards)
        return load_tokenizer(path), Path(cfg.shards)
    if trained_here:
        path = run_dir / "tokenizer.json"
        if not path.is_file():
            from scratchllm.data.sources import sample_texts

            log(f"training a {cfg.tokenizer} tokenizer on {', '.join(cfg.source)}")
            texts, _ = sample_texts(cfg.source)  # at most 100M characters, spread evenly
            tok = (CharTokenizer.train(texts) if cfg.tokenizer == "char" else
                   Tokenizer.train(texts, cfg.vocab_size, progress=progress))
            tok.save(path)
    else:
        path = Path(cfg.tokenizer)
    shards = run_dir / "data"
    meta = prepare(cfg.source, path, shards, PrepareOptions(val_fraction=cfg.val_fraction),
                   progress=progress)
    if not meta["up_to_date"]:
        log(f"prepared {', '.join(cfg.source)}: {meta['splits']['train']['tokens']:,} train and "
            f"{meta['splits']['val']['tokens']:,} val tokens")
    return load_tokenizer(path), shards


def init_model(cfg: PretrainConfig, vocab_size: int, log) -> GPT:
    """A fresh GPT from [model], or the weights of train.init_from (continued pretraining)."""
    source = cfg.train.init_from
    if not source:
        return GPT(cfg.model_config(vocab_size))
    path = Path(source)
    config_file = path / "config.json"
    if config_file.is_file() and "model_type" in read_json_object(
            config_file, "train.init_from takes an HF model directory or a checkpoint"):
        from scratchllm.model.convert import from_hf

        model = from_hf(path)
    else:
        from scratchllm.checkpoint import find_checkpoint

        model = GPT.from_pretrained(find_checkpoint(path))
    if model.config.vocab_size != vocab_size:
        raise UserError(f"train.init_from {source} has a vocabulary of "
                        f"{model.config.vocab_size}, the tokenizer {vocab_size}: use the "
                        "tokenizer the model was trained with (data.tokenizer)")
    log(f"initialised from {source} ({model.num_params():,} parameters); [model] is ignored")
    return model.train()


def accumulation_steps(train: TrainConfig, context_length: int, data_ranks: int = 1) -> int:
    """Micro-batches per optimizer step on each rank: train.batch_tokens (the global batch) /
    (batch_size * context_length * data-parallel ranks)."""
    micro = train.batch_size * context_length * data_ranks
    if train.batch_tokens <= 0:
        return 1
    if train.batch_tokens % micro:
        ranks = f" * {data_ranks} data-parallel ranks" if data_ranks > 1 else ""
        raise UserError(f"train.batch_tokens ({train.batch_tokens}) must be a multiple of "
                        f"batch_size * context_length{ranks} ({micro})")
    return train.batch_tokens // micro


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of every id (special tokens count 0), for bits per byte."""
    specials = set(tokenizer.special_tokens.values())
    return np.array([0 if i in specials else len(tokenizer.decode_bytes([i]))
                     for i in range(tokenizer.vocab_size)], dtype=np.int64)
