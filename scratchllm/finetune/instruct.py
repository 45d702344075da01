"""The instruction-tuning recipe (the book's chapter 7): prompt-response pairs turn a base
model into an assistant, fully or with LoRA, on the shared training loop.

Examples are rendered by a named template (data/chat.py) into ids plus a loss mask: only the
response and its end token are learned (every assistant turn of a conversation), unless
`instruct.train_on_prompt`. The template's name is kept with every checkpoint
(template.json), so chat, generate, evaluate and the server format prompts the same way. When
the base tokenizer lacks the template's special tokens they are added, and the embedding (and
output) rows grow, new rows starting at the mean embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from scratchllm.checkpoint import (  # load_chat_model: re-exported for older imports
    ADAPTER_FILE,
    TEMPLATE_FILE,
    find_checkpoint,
    load_chat_model,
    weights_sha256,
)
from scratchllm.config import Sections, check_choice, check_range
from scratchllm.data.chat import TEMPLATES, Example, Template, get_template, render, render_prompt
from scratchllm.data.chat import ensure_special_tokens as add_specials
from scratchllm.data.instructions import (
    PackedSFTBatches,
    SFTBatches,
    load_instructions,
    parse_fields,
    split_book,
)
from scratchllm.distributed.config import ParallelConfig
from scratchllm.errors import UserError
from scratchllm.model import GPT, lm_loss_sum
from scratchllm.model.lora import (
    LoraConfig,
    apply_lora,
    count_parameters,
    format_parameter_counts,
    load_lora_state_dict,
    lora_state_dict,
)
from scratchllm.model.resize import grow_vocab
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
from scratchllm.train.pretrain import next_token_loss

__all__ = ["InstructConfig", "instruct_trainer", "build_instruct", "load_chat_model",
           "merge_chat_checkpoint", "TEMPLATE_FILE", "ADAPTER_FILE"]

EMBEDDINGS = ["tok_emb.*", "lm_head.*"]  # trained too when new special tokens were added


@dataclass
class InstructTask:
    """What to learn from, in which format, and for how long."""

    checkpoint: str = ""  # the base: a checkpoint or run directory (--checkpoint)
    data: str = "instruction-data"  # or a .json/.jsonl of Alpaca records / {"messages": [...]},
    # or hf:NAME[:CONFIG][@SPLIT], a Hugging Face dataset
    fields: list[str] = field(default_factory=list)  # ["instruction=question", ...]: our keys
    # filled from the source's own (--fields instruction=question,output=answer for GSM8K)
    template: str = "alpaca"  # alpaca | chat
    train_on_prompt: bool = False  # also learn the instruction (the book's exercise)
    pack: bool = False  # several examples per context window, each attending only to itself
    epochs: int = 2  # 0 = train for train.max_steps instead
    eval_prompts: int = 3  # validation prompts answered at every evaluation
    max_new_tokens: int = 64  # for those answers

    def check(self) -> None:
        """Names and ranges, checked when the config is loaded."""
        check_choice("instruct.template", self.template, list(TEMPLATES))
        parse_fields(self.fields)
        check_range("instruct.epochs", self.epochs, 0)
        check_range("instruct.eval_prompts", self.eval_prompts, 0)
        check_range("instruct.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class InstructConfig(Sections):
    """An instruction-tuning run: [instruct], [lora] and the loop's sections."""

    instruct: InstructTask = field(default_factory=InstructTask)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5e-5, min_lr=5e-5, schedule="constant", warmup_steps=0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(sample_tokens=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def instruct_trainer(config: InstructConfig, run_dir: str | Path, resume: str | None = None,
                     progress: bool = True, log=print) -> TrainLoop:
    """The training loop with the instruction-tuning recipe (call .run() to train)."""
    if not config.instruct.checkpoint:
        raise UserError("no base model: pass --checkpoint (a pretrained checkpoint or run dir)")
    return TrainLoop(config, run_dir, build_instruct, resume=resume, progress=progress,
                     log=log, name="instruction tuning")


def build_instruct(loop: TrainLoop) -> Recipe:
    """Base + tokenizer (grown by the template's tokens), rendered splits, what trains, and an
    evaluation that reports val loss and answers a few fixed validation prompts."""
    cfg, task = loop.config, loop.config.instruct
    template = get_template(task.template)
    base_dir = find_checkpoint(task.checkpoint)
    base_tokenizer = load_tokenizer(base_dir / "tokenizer.json")
    tokenizer = add_specials(base_tokenizer, template.special_tokens)
    model = GPT.from_pretrained(base_dir)
    grew = tokenizer.vocab_size > model.config.vocab_size
    if grew:
        loop.log(f"added {tokenizer.vocab_size - base_tokenizer.vocab_size} special tokens of "
                 f"the {template.name} template; embedding rows start at the mean")
        grow_vocab(model, tokenizer.vocab_size)
    T = model.config.context_length
    examples = load_instructions(task.data, task.fields)
    splits = split_book(examples)
    every = split_book(render_all(template, examples, tokenizer, task))
    rendered = {name: [e for e in part if len(e[0]) <= T + 1]  # T + 1 ids fill the context
                for name, part in every.items()}
    if not rendered["train"]:
        raise UserError(f"every training example of {task.data} is longer than the context "
                        f"({T} tokens): use shorter examples or a base with a longer context")
    for name, part in every.items():
        if len(rendered[name]) < len(part):
            loop.log(f"warning: {len(part) - len(rendered[name])} {name} examples are longer "
                     f"than the context ({T} tokens) and were left out")
    loop.log(f"{task.data}: {len(rendered['train'])} train, {len(rendered['val'])} val, "
             f"{len(rendered['test'])} test examples; template {template.name}")

    extra_files = {TEMPLATE_FILE: json.dumps({"template": template.name}) + "\n"}
    adapters = cfg.lora.rank > 0
    if adapters:
        apply_lora(model, cfg.lora, trainable=EMBEDDINGS if grew else [])
        extra_files[ADAPTER_FILE] = json.dumps({
            "lora": asdict(cfg.lora), "trainable": EMBEDDINGS if grew else [],
            "base_checkpoint": str(base_dir.resolve()), "base_sha256": weights_sha256(base_dir)},
            indent=1) + "\n"
    loop.log(format_parameter_counts(*count_parameters(model)))
    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    if task.pack:
        batches = PackedSFTBatches(rendered["train"], T, cfg.train.batch_size, pad_id,
                                   seed=cfg.train.seed)
        loop.log(f"packed {len(rendered['train'])} examples into {batches.n} windows")
    else:
        batches = SFTBatches(rendered["train"], cfg.train.batch_size, pad_id,
                             seed=cfg.train.seed)
    batches.shard(loop.layout.data_rank, loop.layout.data_size)  # per-rank share
    schedule_epochs(cfg, task.epochs, batches.steps_per_epoch)
    prompts = [render_prompt(template, example, tokenizer)
               for example in splits["val"][:task.eval_prompts]]
    return Recipe(
        model=model, batches=batches, loss=packed_loss if task.pack else next_token_loss,
        tokenizer=tokenizer,
        evaluate=Evaluation(rendered["val"], prompts, template.end_token, pad_id, cfg),
        extra_files=extra_files,
        weights=(lambda: lora_state_dict(model, extra=EMBEDDINGS if grew else [])) if adapters
        else None,
        load_weights=(lambda state: load_lora_state_dict(model, state)) if adapters else None)


def render_all(template: Template, examples: list, tokenizer: Any, task: InstructTask
               ) -> list[Example]:
    """(ids, mask) of every example; a bad one fails with its number in the source."""
    out = []
    for n, example in enumerate(examples, 1):
        try:
            out.append(render(template, example, tokenizer, task.train_on_prompt))
        except UserError as e:
            raise UserError(f"{task.data}: example {n}: {e}") from None
    return out


def packed_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Summed next-token loss of packed windows: each token sees only its own example."""
    x, y, documents, positions = batch
    return lm_loss_sum(model(x, document_ids=documents, positions=positions), y)[0]


class Evaluation:
    """Mean response loss on the validation split, and answers to a few of its prompts."""

    def __init__(self, val: list, prompts: list[list[int]], end_token: str, pad_id: int,
                 cfg: InstructConfig):
        self.val, self.prompts, self.end_token, self.pad_id, self.cfg = (
            val, prompts, end_token, pad_id, cfg)

    def __call__(self, loop: TrainLoop) -> dict[str, Any]:
        from scratchllm.data.chat import pad_sft_batch
        from scratchllm.generate import generate

        tokenizer = loop.recipe.tokenizer
        total, count = 0.0, 0
        for start in range(0, len(self.val), 16):
            x, y = pad_sft_batch(self.val[start:start + 16], self.pad_id)
            with autocast(loop.device, self.cfg.train.dtype):
                logits = loop.train_model(x.to(loop.device))
            loss_sum, n = lm_loss_sum(logits, y.to(loop.device))
            total, count = total + float(loss_sum), count + int(n)
        record: dict[str, Any] = {"val_loss": total / max(count, 1)}
        loop.say(f"step {loop.step}: val response loss {record['val_loss']:.4f}")
        stop = (tokenizer.special_tokens[self.end_token],)
        answers = []
        for ids in self.prompts:
            new = generate(loop.model, ids, self.cfg.instruct.max_new_tokens, temperature=0.0,
                           stop_ids=stop)
            answers.append(tokenizer.decode([i for i in new if i not in stop]).strip())
            loop.say(f"  > {answers[-1]!r}")
        if answers:
            record["samples"] = answers
        return record


def merge_chat_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a LoRA instruction run as a plain checkpoint (adapters merged) with its template."""
    from scratchllm.fileio import atomic_write_text

    checkpoint = find_checkpoint(path)
    if not (checkpoint / ADAPTER_FILE).is_file():
        raise UserError(f"{path} has no LoRA adapters: it is a plain checkpoint already")
    model, tokenizer, template = load_chat_model(checkpoint, "cpu")  # adapters merged
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save(out / "tokenizer.json")
    if template is not None:
        atomic_write_text(out / TEMPLATE_FILE, json.dumps({"template": template}) + "\n")
    return out
