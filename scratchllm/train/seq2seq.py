"""The encoder-decoder recipe: translation or summarization on (source, target) pairs.

`seq2seq_trainer(config, run_dir)` returns the shared TrainLoop with this recipe. The pairs are
split once (test, val, train; the test split is written to RUN_DIR/data/test.tsv and never
used for training or tuning), a shared BPE is trained on the train split's two sides, batches
hold about `max_tokens` tokens of similar lengths, and every evaluation reports the val loss
plus BLEU and chrF (translate; sacrebleu) or ROUGE-1/2/L (summarize) of decoded val sentences,
with a few samples. `translate` decodes texts with a trained model (greedy or beam search).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.config import Sections, check_choice, check_range
from scratchllm.data import parallel
from scratchllm.data.parallel import Example, Pair
from scratchllm.distributed.config import ParallelConfig
from scratchllm.errors import UserError
from scratchllm.model.loss import lm_loss_sum
from scratchllm.model.seq2seq import Seq2Seq, Seq2SeqConfig, greedy_decode, smoothed_loss_sum
from scratchllm.runtime import autocast
from scratchllm.train.config import (
    CheckpointConfig,
    EvalConfig,
    OptimConfig,
    TrainConfig,
    schedule_epochs,
)
from scratchllm.train.loop import Recipe, TrainLoop

TASKS = ("translate", "summarize")
# What an unset ("" or 0) [seq2seq] key means for each task.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "translate": dict(data="tatoeba-fra-eng+tico19-en-fr", max_source_len=128,
                      max_target_len=128, max_length_ratio=1.5, max_length_extra=10),
    "summarize": dict(data="gutenberg-lead", max_source_len=256, max_target_len=64,
                      max_length_ratio=0.5, max_length_extra=16),
}
DEFAULT_LANGS = ("fr", "en")  # the default translation data's direction


@dataclass
class Seq2SeqTask:
    """What to learn: data and direction, splits, tokenizer, batching, decoding and metrics.
    An unset key ("" or 0) takes the task's default (TASK_DEFAULTS)."""

    task: str = "translate"  # translate (BLEU, chrF) | summarize (ROUGE)
    data: str = ""  # a data spec (see data/parallel.py); '+' joins several
    source_lang: str = ""  # direction for named sets and TMX files (fr, fra, en, ...)
    target_lang: str = ""
    source_field: str = "source"  # JSONL / hf: record fields
    target_field: str = "target"
    max_pairs: int = 0  # keep at most this many pairs (0 = all)
    test_size: int = 500  # held out, never trained or tuned on
    val_size: int = 200
    split_seed: int = 123
    tokenizer: str = "bpe"  # bpe (one BPE trained on both sides of the train split) or a path
    vocab_size: int = 8000
    max_source_len: int = 0  # tokens kept per source (eos included)
    max_target_len: int = 0  # decoder positions per target (bos + tokens)
    max_tokens: int = 4096  # padded source + target tokens per micro-batch
    epochs: int = 0  # 0 = train for train.max_steps instead
    eval_sentences: int = 200  # val pairs decoded for BLEU/chrF or ROUGE per evaluation
    beams: int = 1  # decoding in evaluation: 1 = greedy, else beam search
    length_penalty: float = 1.0
    max_length_ratio: float = 0.0  # decode at most ratio * source tokens + extra tokens
    max_length_extra: int = 0
    samples: int = 3  # decoded val examples printed at each evaluation

    def check(self) -> None:
        """Names and ranges; fills the task's defaults for unset keys."""
        check_choice("seq2seq.task", self.task, TASKS)
        if not self.data and self.task == "translate" and not (self.source_lang
                                                                or self.target_lang):
            self.source_lang, self.target_lang = DEFAULT_LANGS
        for key, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, key) in ("", 0, 0.0):
                setattr(self, key, value)
        for name in ("max_pairs", "test_size", "val_size", "eval_sentences", "samples",
                     "max_length_extra", "epochs"):
            check_range(f"seq2seq.{name}", getattr(self, name), 0)
        check_range("seq2seq.vocab_size", self.vocab_size, 300)
        check_range("seq2seq.max_source_len", self.max_source_len, 2)
        check_range("seq2seq.max_target_len", self.max_target_len, 2)
        check_range("seq2seq.max_tokens", self.max_tokens, 16)
        check_range("seq2seq.beams", self.beams, 1)
        check_range("seq2seq.max_length_ratio", self.max_length_ratio, 0)
        if bool(self.source_lang) != bool(self.target_lang):
            raise UserError("set both seq2seq.source_lang and seq2seq.target_lang, or neither")


MODEL_KEYS = ["preset", *(f.name for f in fields(Seq2SeqConfig))]


@dataclass
class Seq2SeqTrainConfig(Sections):
    """A seq2seq run: [seq2seq], [model] (a preset plus any Seq2SeqConfig field) and the loop's
    [train], [optim], [eval], [checkpoint], [parallel] (data parallelism: ddp or zero1);
    Adam as in the paper (beta2 0.98, inverse-sqrt)."""

    seq2seq: Seq2SeqTask = field(default_factory=Seq2SeqTask)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "seq2seq-small"},
                                  metadata={"keys": MODEL_KEYS})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2000))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, min_lr=0.0, weight_decay=0.01, beta1=0.9, beta2=0.98, eps=1e-9,
        schedule="inverse_sqrt", warmup_steps=200))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=250, sample_tokens=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def check(self) -> None:
        """[model] must make a valid Seq2SeqConfig with room for the longest source/target;
        [parallel] replicates the model (FSDP and tensor parallelism shard GPT blocks only)."""
        self.model_config(self.seq2seq.vocab_size)
        if self.parallel.data == "fsdp" or self.parallel.tensor > 1:
            raise UserError("seq2seq training runs data-parallel only: set parallel.data to "
                            "ddp or zero1 and parallel.tensor to 1")

    def model_config(self, vocab_size: int, pad_id: int = 0, bos_id: int = 0,
                     eos_id: int = 0) -> Seq2SeqConfig:
        """The Seq2SeqConfig of [model] with the tokenizer's vocabulary and special ids;
        context_length defaults to the longest source or target."""
        spec = dict(self.model)
        preset = spec.pop("preset", None)
        task = self.seq2seq
        longest = max(task.max_source_len, task.max_target_len)
        spec.setdefault("context_length", longest)
        spec.update(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        config = Seq2SeqConfig.preset(preset, **spec) if preset else Seq2SeqConfig.from_dict(spec)
        if config.context_length < longest:
            raise UserError(f"model.context_length ({config.context_length}) is shorter than "
                            f"seq2seq.max_source_len / max_target_len ({longest}): raise it")
        return config


def seq2seq_trainer(config: Seq2SeqTrainConfig, run_dir: str | Path, resume: str | None = None,
                    progress: bool = True, log=print) -> TrainLoop:
    """The training loop with the seq2seq recipe (call .run() to train)."""
    return TrainLoop(config, run_dir, build_seq2seq, resume=resume, progress=progress, log=log,
                     name=config.seq2seq.task)


# ---- data ----------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")


def load_splits(task: Seq2SeqTask, data_dir: Path, log=print
                ) -> tuple[dict[str, list[Pair]], bool]:
    """The run's train/val/test pairs, and whether they were made anew: read back from
    DATA_DIR/*.tsv when the same settings made them (a resumed run keeps its splits), else
    read, split and written there with those settings (DATA_DIR/spec.json; the tokenizer
    settings count too: fresh splits get a fresh BPE)."""
    import json

    from scratchllm.fileio import atomic_write_text

    files = {name: data_dir / f"{name}.tsv" for name in SPLITS}
    spec = {key: getattr(task, key) for key in ("data", "source_lang", "target_lang",
                                                "source_field", "target_field", "max_pairs",
                                                "test_size", "val_size", "split_seed",
                                                "tokenizer", "vocab_size")}
    made = data_dir / "spec.json"
    try:
        fresh = json.loads(made.read_text(encoding="utf-8")) != spec \
            or not all(f.is_file() for f in files.values())
    except (OSError, ValueError):  # no spec.json yet (or a damaged one): split anew
        fresh = True
    if fresh:
        pairs = parallel.read_pairs(task.data, task.source_lang, task.target_lang,
                                    task.source_field, task.target_field, task.max_pairs)
        splits = parallel.split_pairs(pairs, task.val_size, task.test_size, task.split_seed)
        for name, f in files.items():
            parallel.write_tsv(f, splits[name])
        atomic_write_text(made, json.dumps(spec, indent=1) + "\n")
        log(f"{task.data}: {len(pairs):,} pairs -> {len(splits['train']):,} train, "
            f"{len(splits['val']):,} val, {len(splits['test']):,} test (held out) in {data_dir}")
    # Read back in both cases, so a resumed run sees exactly the text the first run trained on.
    return {name: parallel.read_tsv(f) if f.stat().st_size else []
            for name, f in files.items()}, fresh


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(pad, bos, eos): <|pad|> if the tokenizer has it, and <|endoftext|> for both ends."""
    eos = tokenizer.eot_id
    return tokenizer.special_tokens.get("<|pad|>", eos), eos, eos


def ensure_tokenizer(task: Seq2SeqTask, run_dir: Path, train: list[Pair], fresh: bool,
                     progress: bool, log):
    """The run's tokenizer: RUN_DIR/tokenizer.json (a shared BPE trained on the train split,
    again with fresh splits) or the file task.tokenizer names."""
    from scratchllm.tokenizer import load_tokenizer

    if task.tokenizer != "bpe":
        return load_tokenizer(task.tokenizer)
    path = run_dir / "tokenizer.json"
    if fresh or not path.is_file():
        log(f"training a {task.vocab_size}-token BPE on both sides of {len(train):,} pairs")
        parallel.train_tokenizer(train, task.vocab_size, progress).save(path)
    return load_tokenizer(path)


# ---- the recipe ----------------------------------------------------------------------------


def build_seq2seq(loop: TrainLoop) -> Recipe:
    """Splits, tokenizer, model, token-bucketed batches, loss and evaluation."""
    cfg: Seq2SeqTrainConfig = loop.config
    task = cfg.seq2seq
    splits, fresh = load_splits(task, loop.run_dir / "data", loop.log)
    tokenizer = ensure_tokenizer(task, loop.run_dir, splits["train"], fresh, loop.progress,
                                 loop.log)
    pad, bos, eos = special_ids(tokenizer)
    model = Seq2Seq(cfg.model_config(tokenizer.vocab_size, pad, bos, eos))
    loop.log(f"{model.num_params():,} parameters; {model.config.n_encoder_layer}+"
             f"{model.config.n_decoder_layer} layers, d_model {model.config.n_embd}")
    encoded = {name: parallel.encode_pairs(tokenizer, pairs, eos, task.max_source_len,
                                           task.max_target_len)
               for name, pairs in splits.items()}
    batches = parallel.TokenBatches(encoded["train"], task.max_tokens, pad, bos, eos,
                                    cfg.train.seed)
    ranks = loop.layout.data_size
    batches.shard(loop.layout.data_rank, ranks)  # per-rank share
    schedule_epochs(cfg, task.epochs, batches.steps_per_epoch)
    accumulation = max(1, math.ceil(cfg.train.batch_tokens / (task.max_tokens * ranks)))
    smoothing = model.config.label_smoothing

    def loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        src, targets, tgt_in, mask = batch
        return smoothed_loss_sum(model(src, tgt_in, src_mask=mask), targets, smoothing)[0]

    evaluation = Evaluation(encoded["val"], splits["val"], tokenizer, cfg)
    return Recipe(model=model, batches=batches, loss=loss, tokenizer=tokenizer,
                  accumulation=accumulation, evaluate=evaluation)


class Evaluation:
    """Val loss (plain cross-entropy per token) and perplexity, task metrics on decoded val
    pairs, and a few samples."""

    def __init__(self, examples: list[Example], pairs: list[Pair], tokenizer,
                 cfg: Seq2SeqTrainConfig) -> None:
        self.examples, self.pairs, self.tokenizer, self.cfg = examples, pairs, tokenizer, cfg

    def __call__(self, loop: TrainLoop) -> dict[str, Any]:
        task = self.cfg.seq2seq
        record: dict[str, Any] = {}
        if self.examples:
            nll = eval_loss(loop.train_model, self.examples, task.max_tokens, loop.device,
                            self.cfg.train.dtype)
            record.update(val_loss=nll, val_ppl=math.exp(min(nll, 50)))
        parts = [f"val loss {record['val_loss']:.4f}"] if record else []
        n = min(task.eval_sentences, len(self.pairs))
        if n:
            pairs = self.pairs[:n]
            hyps = translate(loop.model, self.tokenizer, [s for s, _ in pairs], task.beams,
                             task.length_penalty, task.max_length_ratio, task.max_length_extra,
                             task.max_source_len)
            scores = task_metrics(task.task, hyps, [t for _, t in pairs])
            record.update({f"val_{k}": v for k, v in scores.items()})
            parts += [f"{k} {v:.2f}" for k, v in scores.items()]
            samples = [{"source": s, "reference": t, "output": h}
                       for (s, t), h in zip(pairs[:task.samples], hyps, strict=False)]
            if samples:
                record["samples"] = samples
        loop.say(f"step {loop.step}: " + ", ".join(parts))
        for sample in record.get("samples", []):
            loop.say(f"  source: {sample['source']}\n  ref:    {sample['reference']}\n"
                     f"  output: {sample['output']}")
        return record


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[Example], max_tokens: int,
              device: torch.device | str, dtype: str = "float32") -> float:
    """Cross-entropy per target token (no label smoothing) over every example; model may be
    wrapped (DDP, compile): the Seq2Seq inside holds the special ids."""
    config = getattr(model, "module", model).config  # DDP keeps the model as .module
    pad, bos, eos = config.pad_id, config.bos_id, config.eos_id
    total, count = 0.0, 0
    for _, batch in parallel.iter_batches(examples, max_tokens, pad, bos, eos):
        src, targets, tgt_in, mask = (t.to(device) for t in batch)
        with autocast(torch.device(device), dtype):
            logits = model(src, tgt_in, src_mask=mask)
        loss, n = lm_loss_sum(logits, targets)
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)


# ---- decoding and metrics ------------------------------------------------------------------


def translate(model: Seq2Seq, tokenizer, texts: list[str], beams: int = 1,
              length_penalty: float = 1.0, max_length_ratio: float = 1.5,
              max_length_extra: int = 10, max_source_len: int = 0,
              batch_tokens: int = 8192) -> list[str]:
    """Decode each text: greedy (batched, by length) or beam search (one text at a time), at
    most max_length_ratio * source tokens + max_length_extra tokens (within the context)."""
    cfg = model.config
    limit_src = min(max_source_len or cfg.context_length, cfg.context_length)
    sources = [parallel.encode_source(tokenizer, text, cfg.eos_id, limit_src) for text in texts]
    limits = [max(1, min(int(max_length_ratio * len(s)) + max_length_extra, cfg.context_length))
              for s in sources]
    outputs: list[list[int]] = [[] for _ in texts]
    if beams > 1:
        from scratchllm.generate import GenerationConfig, beam_search

        for i, (src, limit) in enumerate(zip(sources, limits, strict=True)):
            config = GenerationConfig(max_new_tokens=limit, num_beams=beams,
                                      length_penalty=length_penalty, stop_ids=(cfg.eos_id,))
            outputs[i] = beam_search(model, src, config).ids
    else:
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        start = 0
        while start < len(order):  # batches of similar-length sources
            rows = [order[start]]
            while start + len(rows) < len(order) and (len(rows) + 1) * (
                    len(sources[order[start + len(rows)]]) + limits[order[start + len(rows)]]
            ) <= batch_tokens:
                rows.append(order[start + len(rows)])
            start += len(rows)
            decoded = greedy_decode(model, [sources[i] for i in rows], [limits[i] for i in rows])
            for i, ids in zip(rows, decoded, strict=True):
                outputs[i] = ids
    return [tokenizer.decode(ids).strip() for ids in outputs]


def task_metrics(task: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    """BLEU and chrF (translate) or ROUGE-1/2/L F1 (summarize), and the exact-match rate,
    each 0-100."""
    scores = bleu_chrf(hyps, refs) if task == "translate" else rouge(hyps, refs)
    same = sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True))
    return {**scores, "exact": round(100 * same / max(len(refs), 1), 2)}


def bleu_chrf(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU (13a tokenization) and chrF, as sacrebleu computes them."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU and chrF need sacrebleu: pip install sacrebleu") from None
    return {"bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)}


_WORDS = re.compile(r"[a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization: lower-case alphanumeric runs (no stemming)."""
    return _WORDS.findall(text.lower())


def _f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_hyp, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0  # row[j - 1] of the previous pass
        for j, y in enumerate(b, 1):
            current = row[j]
            row[j] = previous + 1 if x == y else max(row[j], row[j - 1])
            previous = current
    return row[-1]


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the pairs, 0-100 (rouge-score's definitions
    with its default tokenizer and no stemming)."""
    from collections import Counter

    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hyps, refs, strict=True):
        h, r = _rouge_tokens(hyp), _rouge_tokens(ref)
        for n, key in ((1, "rouge1"), (2, "rouge2")):
            hg = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rg = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            totals[key] += _f1(sum((hg & rg).values()), sum(hg.values()), sum(rg.values()))
        totals["rougeL"] += _f1(_lcs(h, r), len(h), len(r))
    return {k: round(100 * v / max(len(hyps), 1), 2) for k, v in totals.items()}


# ---- loading for inference -----------------------------------------------------------------


def load_seq2seq(path: str | Path, device: str | torch.device = "auto", dtype: str = "float32"):
    """(model in eval mode, tokenizer) from a seq2seq run or checkpoint directory."""
    from scratchllm.checkpoint import find_checkpoint
    from scratchllm.runtime import resolve_device, resolve_dtype, torch_dtype
    from scratchllm.tokenizer import load_tokenizer

    device = resolve_device(str(device))
    checkpoint = find_checkpoint(path)
    model = Seq2Seq.from_pretrained(checkpoint, device=device)
    model = model.to(torch_dtype(resolve_dtype(device, dtype))).eval()
    return model, load_tokenizer(checkpoint / "tokenizer.json")


def run_data_dir(path: str | Path) -> Path:
    """RUN_DIR/data for a run directory or one of its checkpoints."""
    path = Path(path)
    for candidate in (path, path.parent.parent):
        if (candidate / "data" / "test.tsv").is_file():
            return candidate / "data"
    raise UserError(f"no data/test.tsv beside {path}: give a run directory made by "
                    "`scratchllm train-seq2seq`, or score a data file")



def run_settings(path: str | Path) -> dict[str, Any]:
    """The [seq2seq] section a checkpoint was trained with ({} if it does not say)."""
    import json

    from scratchllm.checkpoint import find_checkpoint

    file = find_checkpoint(path) / "training.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError):
        return {}
    section = config.get("seq2seq") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else {}
