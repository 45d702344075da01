"""The training loop's config sections, shared by every recipe: [train], [optim], [eval],
[checkpoint]. A recipe's config adds its own sections (data, model, task) beside these."""

import re
from dataclasses import dataclass

from scratchllm.config import check_choice, check_range
from scratchllm.errors import UserError

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 2000  # the run's total length; the LR schedule's horizon
    batch_size: int = 12  # sequences per micro-batch
    batch_tokens: int = 0  # tokens per optimizer step; 0 = one micro-batch; else accumulate
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16 (autocast; fp16 CUDA only)
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    nan_policy: str = "stop"  # stop | skip (a non-finite loss skips that step)
    log_every: int = 10
    init_from: str = ""  # a scratchllm checkpoint or HF model directory to start from
    peak_flops: float = 0.0  # hardware peak FLOP/s for MFU; 0 = measured (CPU) or datasheet (GPU)

    def check(self) -> None:
        """Ranges and names, checked when the config is loaded (before any work)."""
        check_range("train.max_steps", self.max_steps, 1)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.batch_tokens", self.batch_tokens, 0)
        check_range("train.grad_clip", self.grad_clip, 0)
        check_choice("train.dtype", self.dtype, DTYPE_NAMES)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"train.device = {self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        check_range("train.threads", self.threads, 0)
        check_choice("train.nan_policy", self.nan_policy, ("stop", "skip"))
        check_range("train.log_every", self.log_every, 1)
        check_range("train.peak_flops", self.peak_flops, 0)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1  # on matrices only (not norms, biases or embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay)
    # | inverse_sqrt (the Transformer paper's: lr * sqrt(warmup_steps / step) after warmup)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr

    def check(self) -> None:
        """Ranges and names, checked when the config is loaded (before any work)."""
        check_range("optim.lr", self.lr, 0)
        check_range("optim.min_lr", self.min_lr, 0)
        check_range("optim.weight_decay", self.weight_decay, 0)
        check_range("optim.beta1", self.beta1, 0, 1)
        check_range("optim.beta2", self.beta2, 0, 1)
        check_range("optim.eps", self.eps, 0, low_open=True)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_range("optim.warmup_steps", self.warmup_steps, 0)
        check_range("optim.decay_fraction", self.decay_fraction, 0, 1)


@dataclass
class EvalConfig:
    """Evaluation and samples during training."""

    every: int = 250  # steps between evaluations (and at the end); 0 = only at the end
    batches: int = 20  # val batches per evaluation
    prompt: str = "\n"
    sample_tokens: int = 200  # 0 = no sample
    temperature: float = 0.8
    top_k: int = 0  # 0 = off

    def check(self) -> None:
        """Ranges, checked when the config is loaded; the prompt's length is checked against
        the context once the tokenizer is known."""
        check_range("eval.every", self.every, 0)
        check_range("eval.batches", self.batches, 1)
        check_range("eval.sample_tokens", self.sample_tokens, 0)
        check_range("eval.temperature", self.temperature, 0)
        check_range("eval.top_k", self.top_k, 0)
        if self.sample_tokens > 0 and not self.prompt:
            raise UserError("eval.prompt is empty: give the samples a prompt (e.g. \"\\n\") "
                            "or set eval.sample_tokens=0")


@dataclass
class CheckpointConfig:
    """Checkpointing."""

    every: int = 500  # steps between checkpoints (and always at the end or on interrupt)
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the best val loss

    def check(self) -> None:
        """Ranges, checked when the config is loaded (keep_last=0 would delete every
        checkpoint)."""
        check_range("checkpoint.every", self.every, 1)
        check_range("checkpoint.keep_last", self.keep_last, 1)


def schedule_epochs(config, epochs: int, steps_per_epoch: int, evals_per_epoch: int = 1) -> None:
    """For a recipe counted in epochs: train.max_steps from the epochs, and evaluations and
    checkpoints `evals_per_epoch` times an epoch. epochs = 0 keeps the config's own settings."""
    if epochs:
        config.train.max_steps = epochs * steps_per_epoch
        config.eval.every = config.checkpoint.every = max(steps_per_epoch // evals_per_epoch, 1)
