"""The classification recipe: a pretrained GPT becomes a text classifier (the book's ch. 6).

`classifier_trainer(config, run_dir)` returns the shared TrainLoop with this recipe: the LM head
is replaced by Linear(n_embd, num_classes) reading the last real token (or the mean), and the
chosen part trains: the head, the last N blocks + final norm (`last:N`), everything, or LoRA
adapters + the head. Every epoch reports loss, accuracy and macro-F1 on each split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.checkpoint import (
    find_checkpoint,
    load_model,
    load_weights,
    lora_base,
    weights_sha256,
)
from scratchllm.config import Sections, check_choice, check_range
from scratchllm.data.classification import (
    ClassificationBatches,
    encode_texts,
    eval_batches,
    load_classification,
)
from scratchllm.distributed.config import ParallelConfig
from scratchllm.errors import UserError
from scratchllm.fileio import read_json_object
from scratchllm.model import GPT
from scratchllm.model.classifier import POOLINGS, ClassifierConfig, GPTClassifier
from scratchllm.model.lora import (
    LoraConfig,
    apply_lora,
    count_parameters,
    format_parameter_counts,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from scratchllm.runtime import autocast
from scratchllm.tokenizer import load_tokenizer
from scratchllm.train.config import (
    CheckpointConfig,
    EvalConfig,
    OptimConfig,
    TrainConfig,
    schedule_epochs,
)
from scratchllm.train.loop import Recipe, TrainLoop


@dataclass
class ClassifyTask:
    """What to classify, from which base, and which parameters train."""

    checkpoint: str = ""  # the base: a scratchllm checkpoint or run directory (--checkpoint)
    data: str = "sms-spam"  # sms-spam, or a .csv/.tsv/.jsonl/.json file of labelled texts
    text_field: str = "text"
    label_field: str = "label"
    balance: bool = False  # undersample every class to the smallest (always on for sms-spam)
    split_seed: int = 123  # the 70/10/20 train/val/test split
    pooling: str = "last"  # last (the last real token) | mean (over the real tokens)
    trainable: str = "last:1"  # head | last:N (last N blocks + final norm + head) | all
    epochs: int = 5  # 0 = train for train.max_steps instead
    max_length: int = 0  # tokens kept per text; 0 = the model's context length
    dropout: float = -1.0  # embedding/attention/residual dropout while training; -1 = the base's

    def check(self) -> None:
        """Names and ranges, checked when the config is loaded."""
        check_choice("classify.pooling", self.pooling, POOLINGS)
        if self.trainable not in ("head", "all") and not (
                self.trainable.startswith("last:") and self.trainable[5:].isdigit()
                and int(self.trainable[5:]) > 0):
            raise UserError(f"classify.trainable = {self.trainable!r}: use head, all, or last:N "
                            "(the last N blocks, e.g. last:1)")
        check_range("classify.epochs", self.epochs, 0)
        check_range("classify.max_length", self.max_length, 0)
        if self.dropout != -1.0:
            check_range("classify.dropout", self.dropout, 0, 0.99)


@dataclass
class ClassifyConfig(Sections):
    """A classification fine-tuning run: [classify], [lora] and the loop's sections, with the
    book's defaults (AdamW lr 5e-5, weight decay 0.1, batch 8, five epochs)."""

    classify: ClassifyTask = field(default_factory=ClassifyTask)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8, grad_clip=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5e-5, min_lr=5e-5, schedule="constant", warmup_steps=0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(sample_tokens=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def classifier_trainer(config: ClassifyConfig, run_dir: str | Path, resume: str | None = None,
                       progress: bool = True, log=print) -> TrainLoop:
    """The training loop with the classification recipe (call .run() to train)."""
    if not config.classify.checkpoint:
        raise UserError("no base model: pass --checkpoint (a pretrained checkpoint or run dir)")
    return TrainLoop(config, run_dir, build_classification, resume=resume, progress=progress,
                     log=log, name="fine-tuning")


def build_classification(loop: TrainLoop) -> Recipe:
    """The base and its tokenizer, the labelled splits, the classifier, what trains, and a
    per-epoch evaluation; max_steps, eval.every and checkpoint.every follow the epochs."""
    cfg, task = loop.config, loop.config.classify
    base_dir = find_checkpoint(task.checkpoint)
    tokenizer = load_tokenizer(base_dir / "tokenizer.json")
    gpt = GPT.from_pretrained(base_dir)
    splits = load_classification(task.data, task.text_field, task.label_field, task.balance,
                                 task.split_seed)
    max_length = min(task.max_length or gpt.config.context_length, gpt.config.context_length)
    encoded, cut = {}, 0
    for name in ("train", "val", "test"):
        rows, n = encode_texts(tokenizer, [t for t, _ in splits.split(name)], max_length)
        encoded[name], cut = (rows, splits.label_ids(name)), cut + n
    if cut:
        loop.log(f"warning: {cut} texts were longer than {max_length} tokens and were cut")
    loop.log(f"{task.data}: {len(encoded['train'][0])} train, {len(encoded['val'][0])} val, "
             f"{len(encoded['test'][0])} test examples; labels {', '.join(splits.labels)}")
    model = GPTClassifier.from_gpt(gpt, splits.labels, task.pooling,
                                   None if task.dropout < 0 else task.dropout)
    extra: dict[str, Any] = {}
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora, trainable=["head.*"])
        extra = {"lora": asdict(cfg.lora), "base_checkpoint": str(base_dir.resolve()),
                 "base_sha256": weights_sha256(base_dir)}
    else:
        set_trainable(model, task.trainable)
    loop.log(format_parameter_counts(*count_parameters(model)))

    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    batches = ClassificationBatches(*encoded["train"], cfg.train.batch_size, pad_id,
                                    seed=cfg.train.seed)
    batches.shard(loop.layout.data_rank, loop.layout.data_size)  # per-rank share
    schedule_epochs(cfg, task.epochs, batches.steps_per_epoch)
    config = ClassifierConfig(model.config, splits.labels, task.pooling, extra)
    adapters = cfg.lora.rank > 0
    return Recipe(
        model=model, batches=batches, loss=classification_loss, tokenizer=tokenizer,
        evaluate=Evaluation(encoded, splits.labels, pad_id, cfg), config=config,
        count_targets=lambda batch: int(batch[1].numel()),
        weights=(lambda: lora_state_dict(model, extra=["head.*"])) if adapters else None,
        load_weights=(lambda state: load_lora_state_dict(model, state)) if adapters else None)


def classification_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Summed fp32 cross-entropy of the class logits."""
    ids, labels, lengths = batch
    return F.cross_entropy(model(ids, lengths).float(), labels, reduction="sum")


def set_trainable(model: GPTClassifier, trainable: str) -> None:
    """Freeze all but the head, the last N blocks + final norm + head, or nothing."""
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable.startswith("last:"):
        n = int(trainable[5:])
        if n > len(model.blocks):
            raise UserError(f"classify.trainable = {trainable} but the model has "
                            f"{len(model.blocks)} blocks")
        for module in [*model.blocks[-n:], model.norm_f]:
            for p in module.parameters():
                p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)


class Evaluation:
    """Loss, accuracy and macro-F1 per split; the test confusion matrix."""

    def __init__(self, encoded: dict, labels: list[str], pad_id: int, cfg: ClassifyConfig):
        self.encoded, self.labels, self.pad_id, self.cfg = encoded, labels, pad_id, cfg

    def __call__(self, loop: TrainLoop) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if isinstance(loop.recipe.batches, ClassificationBatches):
            record["epoch"] = round(loop.step / loop.recipe.batches.steps_per_epoch, 3)
        parts = []
        for split in ("train", "val", "test"):
            rows, ids = self.encoded[split]
            if not rows:
                continue
            stats = evaluate_split(loop.train_model, rows, ids, len(self.labels), self.pad_id,
                                   loop.device, self.cfg.train.dtype)
            record[f"{split}_loss"], record[f"{split}_acc"] = stats["loss"], stats["accuracy"]
            record[f"{split}_f1"] = stats["f1"]
            if split == "test":
                record["test_confusion"] = stats["confusion"]
            parts.append(f"{split} loss {stats['loss']:.3f} acc {stats['accuracy']:.2%} "
                         f"f1 {stats['f1']:.3f}")
        record["val_loss"] = record.get("val_loss", record.get("train_loss"))
        loop.say(f"step {loop.step}: " + ", ".join(parts))
        return record


def evaluate_split(model: nn.Module, rows: list[list[int]], label_ids: list[int],
                   num_classes: int, pad_id: int, device: torch.device, dtype: str,
                   batch_size: int = 32) -> dict[str, Any]:
    """Mean loss, accuracy, macro-F1 and the confusion matrix [true][predicted] of one split."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total = 0.0
    with torch.no_grad():
        for ids, labels, lengths in eval_batches(rows, label_ids, batch_size, pad_id):
            with autocast(device, dtype):
                logits = model(ids.to(device), lengths.to(device)).float()
            total += float(F.cross_entropy(logits, labels.to(device), reduction="sum"))
            predicted = logits.argmax(-1).cpu()
            confusion += torch.bincount(labels * num_classes + predicted,
                                        minlength=num_classes**2).view(num_classes, num_classes)
    return {"loss": total / len(rows), "accuracy": float(confusion.trace()) / len(rows),
            "f1": macro_f1(confusion), "confusion": confusion.tolist()}


def macro_f1(confusion: Tensor) -> float:
    """The mean over classes of 2PR/(P+R) (0 for a class never predicted nor present)."""
    tp = confusion.diag().float()
    predicted, actual = confusion.sum(0).float(), confusion.sum(1).float()
    f1 = torch.where(predicted + actual > 0, 2 * tp / (predicted + actual).clamp(min=1), 0.0)
    return float(f1.mean())


def load_classifier(path: str | Path, device: str | torch.device = "cpu"):
    """(classifier in eval mode, tokenizer, ClassifierConfig) from a classification run or
    checkpoint; a LoRA run is rebuilt from its base with the adapters applied."""
    checkpoint = find_checkpoint(path)
    data = read_json_object(checkpoint / "config.json",
                            "point at a run of `scratchllm finetune classify`")
    if data.get("kind") != "classifier":
        raise UserError(f"{checkpoint} is not a classifier: train one with "
                        "`scratchllm finetune classify`")
    config = ClassifierConfig.from_dict(data)
    state = load_weights(checkpoint)
    if "lora" in config.extra:
        base = lora_base(checkpoint, config.extra["base_checkpoint"],
                         config.extra["base_sha256"])
        model = GPTClassifier.from_gpt(load_model(base), config.labels, config.pooling)
        apply_lora(model, LoraConfig(**config.extra["lora"]), trainable=["head.*"])
        load_lora_state_dict(model, state)
    else:
        model = GPTClassifier(config)
        model.load_weights(state)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return model.to(device).eval(), tokenizer, config


def merge_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a plain classifier checkpoint (LoRA merged into the weights) to `out`."""
    from scratchllm.fileio import atomic_write_text
    from scratchllm.model.gpt import save_model_files

    model, tokenizer, config = load_classifier(path)
    if "lora" not in config.extra:
        raise UserError(f"{path} has no LoRA adapters: it is a plain checkpoint already")
    model = merge_lora(model)
    plain = ClassifierConfig(config.base, config.labels, config.pooling)
    out = Path(out)
    save_model_files(out, model.state_dict(), plain)
    tokenizer.save(out / "tokenizer.json")
    atomic_write_text(out / "merged_from.txt", f"{Path(path).resolve()}\n")
    return out


def classify_texts(model: GPTClassifier, tokenizer, config: ClassifierConfig,
                   texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """The predicted label and its probability (and all probabilities) of each text."""
    max_length = config.base.context_length
    rows, _ = encode_texts(tokenizer, texts, max_length)
    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    device = model.tok_emb.weight.device
    results = []
    with torch.no_grad():
        for ids, _, lengths in eval_batches(rows, [0] * len(rows), batch_size, pad_id):
            probs = torch.softmax(model(ids.to(device), lengths.to(device)).float(), -1).cpu()
            for p in probs:
                best = int(p.argmax())
                results.append({"label": config.labels[best], "probability": float(p[best]),
                                "probabilities": dict(zip(config.labels, p.tolist(),
                                                          strict=True))})
    return results
