"""The training loop every recipe runs: steps, accumulation, clipping, the LR schedule, the NaN
guard, evaluation, checkpoints, exact resume, metrics, progress and Ctrl-C.

A recipe (pretraining, fine-tuning, ...) is a function that builds a `Recipe`: the model, the
training batches, a loss function and an evaluation hook. The loop knows nothing else about
the task, and it never branches on how the model was laid out: `distributed.parallelize`
applies tensor parallelism, activation checkpointing, compile and DDP/ZeRO/FSDP from outside;
the loop trains `train_model` and saves `model` through `distributed.checkpoint`.

One step: fetch this rank's micro-batches of the step, count the real targets of the whole
global batch (summed over data-parallel ranks), then for each micro-batch add
loss_sum / count to the gradients, so k accumulated micro-batches on N ranks give exactly the
gradient of one batch kN times larger. Clip, step, repeat. Under torchrun only rank 0 prints,
writes metrics and writes the checkpoint files that are not shards.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from scratchllm import checkpoint as ckpt
from scratchllm.distributed.checkpoint import load_run, save_run
from scratchllm.distributed.config import ParallelConfig
from scratchllm.distributed.env import setup_layout
from scratchllm.distributed.parallelize import clip_grad_norm, parallelize
from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text
from scratchllm.model import IGNORE_INDEX
from scratchllm.runtime import (
    autocast,
    peak_flops,
    resolve_dtype,
    reuse_freed_memory,
    seed_everything,
    set_threads,
)
from scratchllm.train.metrics import MetricsLog, plot_run
from scratchllm.train.optim import build_optimizer, lr_at


class Batches(Protocol):
    """Training batches that can say where they are and resume there."""

    def next_batch(self) -> tuple[Tensor, ...]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# (model, batch already on the device) -> the loss summed over the batch's real targets.
LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


def count_targets(batch: tuple[Tensor, ...]) -> int:
    """Real targets of a batch (inputs, targets, ...): those not equal to IGNORE_INDEX."""
    return int((batch[1] != IGNORE_INDEX).sum())


@dataclass
class Recipe:
    """What a recipe hands the loop; built after the run directory, device and seed are set."""

    model: nn.Module  # the plain model: checkpoints hold its state_dict() and its config
    batches: Batches  # training micro-batches (inputs, targets, ...); position saved on resume
    loss: LossFn
    tokenizer: Any  # saved into every checkpoint
    accumulation: int = 1  # micro-batches per optimizer step
    evaluate: Callable[[TrainLoop], dict[str, Any]] | None = None  # 'val_loss' marks the best
    flops_per_token: float = 0.0  # for MFU; 0 = not reported
    count_targets: Callable[[tuple[Tensor, ...]], int] = count_targets
    # What checkpoints hold, when not the whole model: e.g. a LoRA run saves only its adapters
    # and new head (weights), with a config.json naming the base (config), and restores them
    # onto the rebuilt model on resume (load_weights).
    weights: Callable[[], dict[str, Tensor]] | None = None
    config: Any = None
    load_weights: Callable[[dict[str, Tensor]], None] | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # small text files to keep


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    step: int
    interrupted: bool
    checkpoint: Path | None
    val_loss: float | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True  # False on torchrun ranks other than 0, which report nothing


class TrainLoop:
    """Runs one run in RUN_DIR; `run()` trains to train.max_steps or until stopped.

    config: a recipe config with [train], [optim], [eval] and [checkpoint] sections.
    build(loop) -> Recipe is called once the device is known (loop.device) and seeds are set.
    """

    def __init__(self, config, run_dir: str | Path, build: Callable[[TrainLoop], Recipe],
                 resume: str | None = None, progress: bool = True, log=print,
                 name: str = "training"):
        self.config, self.run_dir, self.build = config, Path(run_dir), build
        self.resume, self.progress, self.log, self.name = resume, progress, log, name
        self.stop_requested = False  # set by SIGINT/SIGTERM (or a test) to save and stop
        self.step_callbacks: list = []  # called as fn(loop, step) after every step
        self._bar = None

    # --- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step: the process layout, run dir, device, seed, the
        recipe, the model laid out (TP, AC, compile, FSDP/DDP), the optimizer, the resumed
        state."""
        cfg, run_dir = self.config, self.run_dir
        # A recipe config without a [parallel] section runs as one process.
        self.layout = setup_layout(getattr(cfg, "parallel", None) or ParallelConfig("none"),
                                   cfg.train.device)
        if not self.layout.is_main:  # one voice: rank 0 prints, logs and draws progress
            self.log, self.progress = (lambda *args, **kwargs: None), False
        self.device = self.layout.device
        resume_from = self._resume_checkpoint()
        if self.layout.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.recover_checkpoints(run_dir)
        self.layout.barrier()
        cfg.train.dtype = resolve_dtype(self.device, cfg.train.dtype)
        set_threads(cfg.train.threads)
        reuse_freed_memory()  # steps reuse the last step's activations' memory
        seed_everything(cfg.train.seed)  # the same on every rank: the same initial weights
        self.recipe = self.build(self)
        # After build: a recipe may derive settings (e.g. max_steps from epochs).
        if self.layout.is_main:
            atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        self.model = self.recipe.model.to(self.device)
        self.train_model = parallelize(self.model, self.layout, cfg.train.activation_checkpointing,
                                       cfg.train.compile, cfg.train.dtype)
        zero = self.layout.data_layout == "zero1"
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device,
                                         self.layout.mesh["data"].get_group() if zero else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.dtype == "float16")
        self.step, self.best_val, self.best_name, self.last_val = 0, math.inf, None, None
        self.tokens_seen = 0
        if resume_from is not None:
            self._load(resume_from)
        self.peak = cfg.train.peak_flops or peak_flops(self.device, cfg.train.dtype)
        self.metrics = MetricsLog(run_dir, resume_step=self.step if resume_from else None,
                                  log=self.log) if self.layout.is_main else _NoMetrics()
        self.last_checkpoint = resume_from

    def _resume_checkpoint(self) -> Path | None:
        existing = ckpt.list_checkpoints(self.run_dir)
        if self.resume is None:
            if existing:
                raise UserError(f"{self.run_dir} already holds a run (checkpoints up to "
                                f"{existing[-1].name}); pass --resume to continue it, or choose "
                                "another --out")
            return None
        if self.resume == "auto":
            return existing[-1] if existing else None
        return ckpt.find_checkpoint(self.resume)

    def _load(self, checkpoint: Path) -> None:
        # Our models' load_weights restores tied weights and explains a mismatch.
        load = (self.recipe.load_weights or getattr(self.model, "load_weights", None)
                or self.model.load_state_dict)
        state = load_run(self.layout, checkpoint, model=self.model, optimizer=self.optimizer,
                         load_weights=load)
        self.recipe.batches.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val = state.get("best_val", math.inf) or math.inf
        self.best_name = state.get("best_checkpoint")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.log(f"resuming from {checkpoint} at step {self.step}")

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until max_steps (or a stop request); always leave a checkpoint behind."""
        self.setup()
        cfg = self.config
        max_steps = cfg.train.max_steps
        result = TrainResult(self.step, False, self.last_checkpoint)
        with self._signals():
            self._bar = _bar(self.step, max_steps, self.progress, self.name)
            window_tokens, window_time = 0, 0.0  # training steps only, not eval or saving
            try:
                while self.step < max_steps and not self._stopping():
                    start = time.perf_counter()
                    loss, grad_norm, tokens = self.train_step()
                    window_time += time.perf_counter() - start
                    self.step += 1
                    self.tokens_seen += tokens
                    window_tokens += tokens
                    last = self.step == max_steps
                    if self.step % cfg.train.log_every == 0 or last:
                        tps = window_tokens / max(window_time, 1e-9)
                        self._log_step(loss, grad_norm, tps)
                        window_tokens, window_time = 0, 0.0
                    self._bar.update(1)
                    self._evaluate_and_save(result, last)
                    for callback in self.step_callbacks:
                        callback(self, self.step)
                # Stopped between checkpoints (Ctrl-C, SIGTERM): keep the work. After an
                # exception (NaN, a crash mid-step) the state may be half-updated: not saved.
                saved = self.last_checkpoint.name if self.last_checkpoint else None
                if self.step > 0 and saved != ckpt.step_dir_name(self.step):
                    self.save()
            finally:
                self._bar.close()
                self.metrics.close()
                if self.layout.is_main:
                    with contextlib.suppress(UserError):
                        plot_run(self.run_dir)
                self.layout.close()
        result.step, result.checkpoint = self.step, self.last_checkpoint
        result.interrupted, result.val_loss = self.step < max_steps, self.last_val
        result.is_main = self.layout.is_main
        return result

    def _evaluate_and_save(self, result: TrainResult, last: bool) -> None:
        """Evaluate and checkpoint when due; each step is written at most once."""
        cfg = self.config
        save = self.step % cfg.checkpoint.every == 0 or last
        if (cfg.eval.every and self.step % cfg.eval.every == 0) or last:
            try:
                result.last_eval = self.evaluate()
            except BaseException:
                if last:  # a failing (or interrupted) final evaluation never costs the run
                    self.save()
                raise
            save = save or self.step == self._best_step()  # a new best is kept
        if save:
            self.save()

    def _stopping(self) -> bool:
        """A stop request (Ctrl-C, SIGTERM) on any rank stops every rank after the same step."""
        if not self.layout.distributed:
            return self.stop_requested
        import torch.distributed as dist

        flag = torch.tensor(float(self.stop_requested), device=self.device)
        dist.all_reduce(flag)
        return bool(flag > 0)

    def train_step(self) -> tuple[float, float | None, int]:
        """One optimizer step over `accumulation` micro-batches: (loss, grad norm, tokens)."""
        cfg, recipe, layout = self.config, self.recipe, self.layout
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [recipe.batches.next_batch() for _ in range(recipe.accumulation)]
        # Every micro-batch divides by the real targets of the whole global step (exact
        # accumulation on any number of ranks).
        n_targets = layout.sum_over_data(sum(recipe.count_targets(batch) for batch in batches))
        # DDP and FSDP average gradients over the data ranks; the loss is already the global
        # mean, so scale each rank's part back up to a sum.
        scale = layout.data_size / max(n_targets, 1)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            with layout.micro_step(self.train_model, last=i == len(batches) - 1):
                with autocast(self.device, cfg.train.dtype):
                    loss = recipe.loss(self.train_model, batch) * scale
                self.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = layout.sum_over_data(float(total)) / layout.data_size
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.train.nan_policy == "skip":
                self.log(f"warning: loss is {loss_value} at step {self.step + 1}; step skipped")
                return loss_value, None, 0
            last = self.last_checkpoint or "none yet"
            raise UserError(f"loss became {loss_value} at step {self.step + 1}; stopped without "
                            f"saving the bad state. Last good checkpoint: {last}. Lower "
                            "optim.lr, or set train.nan_policy=skip")
        grad_norm = None
        if cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm(self.model, cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, layout.data_size * sum(int(b[0].numel()) for b in batches)

    def _log_step(self, loss: float, grad_norm: float | None, tps: float) -> None:
        record: dict[str, Any] = {
            "step": self.step, "loss": loss,
            "lr": lr_at(self.step - 1, self.config.optim, self.config.train.max_steps),
            "tokens_per_sec": round(tps, 1), "tokens": self.tokens_seen,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.peak and self.recipe.flops_per_token:
            # the peak is one device's: the run has world_size of them
            record["mfu"] = round(self.recipe.flops_per_token * tps
                                  / (self.peak * self.layout.world_size), 4)
        self.metrics.write(record)
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
        if "mfu" in record:
            postfix["mfu"] = f"{record['mfu']:.1%}"
        self._bar.set_postfix(postfix, refresh=False)
        if not self.progress:
            self.log(f"step {self.step}/{self.config.train.max_steps}  loss {loss:.4f}  "
                     f"{tps:,.0f} tok/s" + (f"  mfu {record['mfu']:.1%}" if "mfu" in record
                                             else ""))

    def evaluate(self) -> dict[str, Any]:
        """Run the recipe's evaluation in eval mode; record it; track the best val loss."""
        if self.recipe.evaluate is None:
            return {}
        self.model.eval()
        try:
            with torch.no_grad():
                record = {"step": self.step, **self.recipe.evaluate(self)}
        finally:
            self.model.train()
        self.metrics.write(record)
        if "val_loss" in record:
            self.last_val = record["val_loss"]
            if self.last_val < self.best_val:
                self.best_val = self.last_val
                if self.config.checkpoint.keep_best:
                    self.best_name = ckpt.step_dir_name(self.step)
        return record

    def _best_step(self) -> int | None:
        return int(self.best_name[len(ckpt.PREFIX):]) if self.best_name else None

    def say(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        (self._bar.write if self.progress and self._bar is not None else self.log)(message)

    def save(self) -> None:
        """Write this step's checkpoint, then prune the old ones."""
        cfg = self.config
        state = {"tokens_seen": self.tokens_seen, "loader": self.recipe.batches.state_dict(),
                 "best_val": self.best_val if math.isfinite(self.best_val) else None,
                 "best_checkpoint": self.best_name, "val_loss": self.last_val,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "config": cfg.to_dict()}
        recipe = self.recipe
        self.last_checkpoint = save_run(
            self.layout, self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
            weights=recipe.weights,
            config=recipe.config if recipe.config is not None else self.model.config,
            tokenizer=recipe.tokenizer, state=state, extra_files=recipe.extra_files)
        if self.layout.is_main:
            keep = {self.best_name} if cfg.checkpoint.keep_best and self.best_name else set()
            ckpt.prune_checkpoints(self.run_dir, cfg.checkpoint.keep_last, keep)
        self.layout.barrier()

    @contextlib.contextmanager
    def _signals(self):
        """First Ctrl-C / SIGTERM: finish the step, save, stop. A second Ctrl-C: stop now."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then "
                     "saving a checkpoint (Ctrl-C again to stop at once)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class _NoMetrics:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(start: int, total: int, enabled: bool, name: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc=name, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
