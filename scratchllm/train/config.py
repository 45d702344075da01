"""The training loop's config sections, shared by every recipe: [train], [optim], [eval],
[checkpoint]. A recipe's config adds its own sections (data, model, task) beside these."""

from dataclasses import dataclass


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
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr


@dataclass
class EvalConfig:
    """Evaluation and samples during training."""

    every: int = 250  # steps between evaluations (and at the end); 0 = only at the end
    batches: int = 20  # val batches per evaluation
    prompt: str = "\n"
    sample_tokens: int = 200  # 0 = no sample
    temperature: float = 0.8
    top_k: int = 0  # 0 = off


@dataclass
class CheckpointConfig:
    """Checkpointing."""

    every: int = 500  # steps between checkpoints (and always at the end or on interrupt)
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the best val loss
