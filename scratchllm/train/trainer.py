"""The pretraining loop: data, model, AdamW, evaluation, checkpoints, exact resume.

One step: fetch the micro-batches of the step, count their real target tokens, then for each
micro-batch add sum(cross-entropy) / count to the gradients, so k accumulated micro-batches
give exactly the gradient of one batch k times larger. Clip, step, repeat.
"""

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.config import RunConfig
from scratchllm.data.loader import RandomWindows, SequentialWindows, load_tokens
from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text
from scratchllm.model import GPT, IGNORE_INDEX, lm_loss_sum
from scratchllm.model.flops import flops_per_token
from scratchllm.train import checkpoint as ckpt
from scratchllm.train.metrics import MetricsLog, plot_run
from scratchllm.train.optim import build_optimizer, lr_at
from scratchllm.train.setup import (
    autocast,
    ensure_data,
    init_model,
    peak_flops,
    prepare_model,
    resolve_device,
    resolve_dtype,
    seed_everything,
)


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    step: int
    interrupted: bool
    checkpoint: Path | None
    val_loss: float | None = None
    samples: list[str] = field(default_factory=list)


class Trainer:
    """Runs one pretraining run in RUN_DIR; `run()` trains to max_steps or until stopped."""

    def __init__(self, config: RunConfig, run_dir: str | Path, resume: str | None = None,
                 progress: bool = True, log=print):
        self.config, self.run_dir = config, Path(run_dir)
        self.resume, self.progress, self.log = resume, progress, log
        self.stop_requested = False  # set by SIGINT/SIGTERM (or a test) to save and stop
        self.step_callbacks: list = []  # called as fn(trainer, step) after every step

    # --- setup --------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, run_dir = self.config, self.run_dir
        resume_from = self._resume_checkpoint()
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partials(run_dir)
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        self.device = resolve_device(cfg.train.device)
        cfg.train.dtype = resolve_dtype(self.device, cfg.train.dtype)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.tokenizer, shards = ensure_data(cfg.data, run_dir, self.progress, self.log)
        self.model: GPT = init_model(cfg, self.tokenizer.vocab_size, self.log).to(self.device)
        self.model_config = self.model.config
        T = self.model_config.context_length
        self.train_tokens = load_tokens(shards, "train", self.tokenizer)
        self.val_tokens = load_tokens(shards, "val", self.tokenizer)
        self.accum = _accumulation(cfg, T)
        loader_cls = {"random": RandomWindows, "sequential": SequentialWindows}.get(
            cfg.data.loader)
        if loader_cls is None:
            raise UserError(f"unknown data.loader {cfg.data.loader!r}: random or sequential")
        self.loader = loader_cls(self.train_tokens, cfg.train.batch_size, T, seed=cfg.train.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.dtype == "float16")
        self.step, self.best_val, self.best_name, self.last_val = 0, math.inf, None, None
        self.tokens_seen = 0
        if resume_from is not None:
            self._load(resume_from)
        # Compile and activation checkpointing wrap the model from outside, after loading.
        self.train_model = prepare_model(self.model, cfg.train)
        self.token_bytes = _token_byte_lengths(self.tokenizer)
        self.flops_per_token = flops_per_token(self.model_config, T)
        self.peak = cfg.train.peak_flops or peak_flops(self.device, cfg.train.dtype)
        self.metrics = MetricsLog(run_dir, resume_step=self.step if resume_from else None)
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
        from safetensors.torch import load_file

        try:
            weights = load_file(checkpoint / "model.safetensors", device=str(self.device))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{checkpoint}/model.safetensors is unreadable ({e}); delete that "
                            "checkpoint directory to resume from the one before") from None
        self.model.load_weights(weights)
        state = ckpt.load_training_state(checkpoint, self.optimizer)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val = state.get("best_val", math.inf) or math.inf
        self.best_name = state.get("best_checkpoint")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.log(f"resuming from {checkpoint} at step {self.step}")

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until max_steps (or a stop request); always leave a checkpoint behind."""
        self._setup()
        cfg = self.config
        max_steps = cfg.train.max_steps
        result = TrainResult(self.step, False, self.last_checkpoint)
        with self._signals():
            bar = _bar(self.step, max_steps, self.progress)
            window_tokens, window_time = 0, 0.0  # training steps only, not eval or saving
            try:
                while self.step < max_steps and not self.stop_requested:
                    start = time.perf_counter()
                    loss, grad_norm, tokens = self._train_step()
                    window_time += time.perf_counter() - start
                    self.step += 1
                    self.tokens_seen += tokens
                    window_tokens += tokens
                    if self.step % cfg.train.log_every == 0 or self.step == max_steps:
                        tps = window_tokens / max(window_time, 1e-9)
                        self._log_step(loss, grad_norm, tps, bar)
                        window_tokens, window_time = 0, 0.0
                    bar.update(1)
                    if (cfg.eval.every and self.step % cfg.eval.every == 0) or \
                            self.step == max_steps:
                        result.samples = self._evaluate(bar)
                    if self.step % cfg.checkpoint.every == 0 or self.step == max_steps:
                        self._save()
                    for callback in self.step_callbacks:
                        callback(self, self.step)
                # Stopped between checkpoints (Ctrl-C, SIGTERM): keep the work. After an
                # exception (NaN, a crash mid-step) the state may be half-updated: not saved.
                saved = self.last_checkpoint.name if self.last_checkpoint else None
                if self.step > 0 and saved != ckpt.step_dir_name(self.step):
                    self._save()
            finally:
                bar.close()
                self.metrics.close()
                with contextlib.suppress(UserError):
                    plot_run(self.run_dir)
        result.step, result.checkpoint = self.step, self.last_checkpoint
        result.interrupted, result.val_loss = self.step < max_steps, self.last_val
        return result

    def _train_step(self) -> tuple[float, float | None, int]:
        cfg, model = self.config, self.train_model
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.loader.next_batch() for _ in range(self.accum)]
        # Every micro-batch divides by the real targets of the whole step (exact accumulation).
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, cfg.train.dtype):
                logits = model(x)
            loss_sum, _ = lm_loss_sum(logits, y)
            loss = loss_sum / max(n_targets, 1)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = float(total)
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
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             cfg.train.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, sum(int(x.numel()) for x, _ in batches)

    def _log_step(self, loss: float, grad_norm: float | None, tps: float, bar) -> None:
        record: dict[str, Any] = {
            "step": self.step, "loss": loss,
            "lr": lr_at(self.step - 1, self.config.optim, self.config.train.max_steps),
            "tokens_per_sec": round(tps, 1), "tokens": self.tokens_seen,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.peak:
            record["mfu"] = round(self.flops_per_token * tps / self.peak, 4)
        self.metrics.write(record)
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
        if "mfu" in record:
            postfix["mfu"] = f"{record['mfu']:.1%}"
        bar.set_postfix(postfix, refresh=False)
        if not self.progress:
            self.log(f"step {self.step}/{self.config.train.max_steps}  loss {loss:.4f}  "
                     f"{tps:,.0f} tok/s" + (f"  mfu {record['mfu']:.1%}" if "mfu" in record
                                             else ""))

    @torch.no_grad()
    def _evaluate(self, bar) -> list[str]:
        cfg, model = self.config, self.model
        model.eval()
        T = self.model_config.context_length
        # The same val windows every time (their own seed), so evaluations compare.
        loader = RandomWindows(self.val_tokens, cfg.train.batch_size, T, seed=0)
        nats, targets, n_bytes = 0.0, 0, 0
        for _ in range(cfg.eval.batches):
            x, y = loader.next_batch()
            with autocast(self.device, cfg.train.dtype):
                logits = self.train_model(x.to(self.device))
            loss_sum, count = lm_loss_sum(logits, y.to(self.device))
            nats += float(loss_sum)
            targets += int(count)
            n_bytes += int(self.token_bytes[y.numpy()].sum())
        val_loss = nats / max(targets, 1)
        record = {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "val_bpb": nats / math.log(2) / max(n_bytes, 1)}
        samples = []
        if cfg.eval.sample_tokens > 0:
            samples = [self.sample(cfg.eval.prompt, cfg.eval.sample_tokens)]
            record["sample"] = samples[0]
        self.metrics.write(record)
        model.train()
        self.last_val = val_loss
        message = (f"step {self.step}: val loss {val_loss:.4f}, ppl {record['val_ppl']:.2f}, "
                   f"{record['val_bpb']:.3f} bits/byte")
        (bar.write if self.progress else self.log)(message)
        if samples:
            (bar.write if self.progress else self.log)(f"sample: {samples[0]!r}")
        if val_loss < self.best_val:
            self.best_val = val_loss
            if self.config.checkpoint.keep_best:
                self.best_name = ckpt.step_dir_name(self.step)
                self._save()
        return samples

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        """A sample from the current model (its own RNG: training randomness is untouched)."""
        from scratchllm.generate import generate

        ids = self.tokenizer.encode(prompt, allowed_special="all")
        new = generate(self.model, ids, max_new_tokens=max_new_tokens,
                       temperature=self.config.eval.temperature,
                       top_k=self.config.eval.top_k or None, seed=seed)
        return prompt + self.tokenizer.decode(new)

    def _save(self) -> None:
        cfg = self.config
        state = {"tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(),
                 "best_val": self.best_val if math.isfinite(self.best_val) else None,
                 "best_checkpoint": self.best_name, "val_loss": self.last_val,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "config": cfg.to_dict()}
        self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.model,
                                                    self.optimizer, self.tokenizer, state)
        keep = {self.best_name} if cfg.checkpoint.keep_best and self.best_name else set()
        ckpt.prune_checkpoints(self.run_dir, cfg.checkpoint.keep_last, keep)

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


def _accumulation(cfg: RunConfig, context_length: int) -> int:
    micro = cfg.train.batch_size * context_length
    if cfg.train.batch_tokens <= 0:
        return 1
    if cfg.train.batch_tokens % micro:
        raise UserError(f"train.batch_tokens ({cfg.train.batch_tokens}) must be a multiple of "
                        f"batch_size * context_length ({micro})")
    return cfg.train.batch_tokens // micro


def _token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of every id (special tokens count 0), for bits per byte."""
    specials = set(tokenizer.special_tokens.values())
    return np.array([0 if i in specials else len(tokenizer.decode_bytes([i]))
                     for i in range(tokenizer.vocab_size)], dtype=np.int64)


def _bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="pretraining", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
