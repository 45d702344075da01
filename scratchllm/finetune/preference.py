"""The DPO recipe (the book's bonus to chapter 7): preference pairs tune an instruction-tuned
model toward the chosen responses, on the shared training loop.

The reference model is the starting policy; its log-probabilities of every pair are computed
once up front (no second model in memory), then the policy trains on dpo_loss (finetune/dpo.py).
Evaluations report the DPO loss, the chosen/rejected rewards, their margin and the reward
accuracy on the validation pairs and on as many training pairs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.checkpoint import (
    ADAPTER_FILE,
    TEMPLATE_FILE,
    find_checkpoint,
    load_chat_model,
    weights_sha256,
)
from scratchllm.config import Sections, check_range
from scratchllm.data.chat import get_template, pad_sft_batch, render
from scratchllm.data.epochs import EpochOrder
from scratchllm.data.preference import load_preference
from scratchllm.distributed.config import ParallelConfig
from scratchllm.errors import UserError
from scratchllm.finetune.dpo import dpo_loss, dpo_metrics, sequence_logprobs
from scratchllm.model.lora import (
    LoraConfig,
    apply_lora,
    count_parameters,
    format_parameter_counts,
    load_lora_state_dict,
    lora_state_dict,
)
from scratchllm.runtime import autocast
from scratchllm.train.config import (
    CheckpointConfig,
    EvalConfig,
    OptimConfig,
    TrainConfig,
    schedule_epochs,
)
from scratchllm.train.loop import Recipe, TrainLoop


@dataclass
class DPOTask:
    """The policy to tune, the pairs, and DPO's settings."""

    checkpoint: str = ""  # the instruction-tuned model (--checkpoint), also the reference
    data: str = "preference-data"  # or a .json of {instruction, input, chosen, rejected}
    beta: float = 0.1  # how far the policy may move from the reference
    average: bool = False  # mean log-prob per response token (the book) instead of the sum
    epochs: int = 1  # 0 = train for train.max_steps instead
    template: str = ""  # "" = the checkpoint's own template (alpaca when it has none)

    def check(self) -> None:
        """Ranges, checked when the config is loaded."""
        check_range("dpo.beta", self.beta, 0, low_open=True)
        check_range("dpo.epochs", self.epochs, 0)


@dataclass
class DPOConfig(Sections):
    """A DPO run: [dpo], [lora] and the loop's sections (the book: lr 5e-6, batch 8)."""

    dpo: DPOTask = field(default_factory=DPOTask)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5e-6, min_lr=5e-6, schedule="constant", warmup_steps=0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(sample_tokens=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def dpo_trainer(config: DPOConfig, run_dir: str | Path, resume: str | None = None,
                progress: bool = True, log=print) -> TrainLoop:
    """The training loop with the DPO recipe (call .run() to train)."""
    if not config.dpo.checkpoint:
        raise UserError("no model to tune: pass --checkpoint (an instruction-tuned run)")
    return TrainLoop(config, run_dir, build_dpo, resume=resume, progress=progress, log=log,
                     name="DPO")


def build_dpo(loop: TrainLoop) -> Recipe:
    """Policy (and reference log-probs), rendered pairs, batches and the reward evaluation."""
    cfg, task = loop.config, loop.config.dpo
    # A LoRA run comes back merged: DPO tunes (and LoRA-DPO adapts) the merged model.
    model, tokenizer, template_name = load_chat_model(task.checkpoint, "cpu")
    template = get_template(task.template or template_name or "alpaca")
    splits = load_preference(task.data)
    T = model.config.context_length
    pairs: dict[str, list] = {}
    for name in ("train", "val"):
        pairs[name] = []
        for pair in splits.split(name):
            chosen = render(template, pair.record(pair.chosen), tokenizer)
            rejected = render(template, pair.record(pair.rejected), tokenizer)
            if max(len(chosen[0]), len(rejected[0])) <= T + 1:
                pairs[name].append((chosen, rejected))
        if len(pairs[name]) < len(splits.split(name)):
            loop.log(f"warning: {len(splits.split(name)) - len(pairs[name])} {name} pairs are "
                     f"longer than the context ({T} tokens) and were left out")
    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    model.train()
    reference = {name: reference_logprobs(model, p, pad_id, task.average)
                 for name, p in pairs.items()}  # the policy before any step: the reference
    loop.log(f"{task.data}: {len(pairs['train'])} train and {len(pairs['val'])} val pairs; "
             f"template {template.name}; reference log-probs computed")
    extra_files = {TEMPLATE_FILE: json.dumps({"template": template.name}) + "\n"}
    adapters = cfg.lora.rank > 0
    if adapters:
        base_dir = find_checkpoint(task.checkpoint)
        apply_lora(model, cfg.lora)
        extra_files[ADAPTER_FILE] = json.dumps({
            "lora": asdict(cfg.lora), "trainable": [], "base_checkpoint": str(base_dir.resolve()),
            "base_sha256": weights_sha256(base_dir)}, indent=1) + "\n"
    loop.log(format_parameter_counts(*count_parameters(model)))
    batches = PairBatches(pairs["train"], reference["train"], cfg.train.batch_size, pad_id,
                          cfg.train.seed)
    batches.shard(loop.layout.data_rank, loop.layout.data_size)  # per-rank share
    schedule_epochs(cfg, task.epochs, batches.steps_per_epoch, evals_per_epoch=2)

    def loss(policy: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        xc, yc, xr, yr, ref_c, ref_r = batch
        pc = sequence_logprobs(policy(xc), yc, task.average)
        pr = sequence_logprobs(policy(xr), yr, task.average)
        return dpo_loss(pc, pr, ref_c, ref_r, task.beta)[0] * len(xc)  # summed over pairs

    evaluation = Evaluation(pairs, reference, pad_id, cfg)
    return Recipe(
        model=model, batches=batches, loss=loss, tokenizer=tokenizer, evaluate=evaluation,
        count_targets=lambda batch: len(batch[0]), extra_files=extra_files,
        weights=(lambda: lora_state_dict(model)) if adapters else None,
        load_weights=(lambda state: load_lora_state_dict(model, state)) if adapters else None)


def reference_logprobs(model: nn.Module, pairs: list, pad_id: int, average: bool,
                       batch_size: int = 16) -> Tensor:
    """(N, 2) log-probs of each pair's chosen and rejected response under `model`."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            logprobs = []
            for side in (0, 1):
                x, y = pad_sft_batch([p[side] for p in chunk], pad_id)
                logprobs.append(sequence_logprobs(model(x), y, average))
            out.append(torch.stack(logprobs, dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


class PairBatches(EpochOrder):
    """Shuffled batches of pairs with their reference log-probs, resumable; full batches only."""

    def __init__(self, pairs: list, reference: Tensor, batch_size: int, pad_id: int, seed: int):
        super().__init__(len(pairs), batch_size, seed, "dpo", "the training pairs")
        self.pairs, self.reference, self.pad_id = pairs, reference, pad_id

    def next_batch(self) -> tuple[Tensor, ...]:
        take = self.next_indices()
        return pair_batch([self.pairs[i] for i in take], self.reference[torch.as_tensor(take)],
                          self.pad_id)


def pair_batch(pairs: list, reference: Tensor, pad_id: int) -> tuple[Tensor, ...]:
    """(chosen inputs, chosen targets, rejected inputs, rejected targets, ref chosen, ref rej)."""
    xc, yc = pad_sft_batch([p[0] for p in pairs], pad_id)
    xr, yr = pad_sft_batch([p[1] for p in pairs], pad_id)
    return xc, yc, xr, yr, reference[:, 0], reference[:, 1]


class Evaluation:
    """DPO loss and rewards on the validation pairs and on as many training pairs."""

    def __init__(self, pairs: dict, reference: dict, pad_id: int, cfg: DPOConfig):
        n = len(pairs["val"])
        self.sets = {"val": (pairs["val"], reference["val"]),
                     "train": (pairs["train"][:n], reference["train"][:n])}
        self.pad_id, self.cfg = pad_id, cfg

    def __call__(self, loop: TrainLoop) -> dict[str, Any]:
        task, record = self.cfg.dpo, {}
        for name, (pairs, reference) in self.sets.items():
            if not pairs:
                continue
            with autocast(loop.device, self.cfg.train.dtype):
                policy = reference_logprobs(loop.train_model, pairs, self.pad_id, task.average)
            policy, reference = policy.to(reference.device).float(), reference.float()
            loss, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0],
                                              reference[:, 1], task.beta)
            record[f"{name}_loss"] = float(loss)
            for key, value in dpo_metrics(chosen, rejected).items():
                record[f"{name}_{key}"] = value
        record["val_loss"] = record.get("val_loss", record.get("train_loss"))
        loop.say(f"step {loop.step}: val DPO loss {record['val_loss']:.4f}, reward margin "
                 f"{record.get('val_reward_margin', 0):.3f}, reward accuracy "
                 f"{record.get('val_reward_accuracy', 0):.2%}")
        return record
