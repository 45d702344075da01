"""Generate responses for an instruction split, their response loss, and a resumable JSONL.

Each example's record holds the prompt (instruction plus input), the reference output, the
greedy response (stopped at the template's end token) and the response loss: the mean negative
log-likelihood of the reference response tokens (and their end token, exactly the tokens that
`render`'s mask learns) given the prompt. Records are appended one JSON line at a time, keyed by
example index plus a hash of the prompt, so an interrupted or judge-less run can be continued:
a rerun skips what is done and only adds what is missing (the last line of a key wins).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchllm.data.chat import Template, get_template, render, render_prompt, shift, to_messages
from scratchllm.data.formats import alpaca_text
from scratchllm.data.instructions import load_instructions, split_book
from scratchllm.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from scratchllm.evaluate.judge import JudgeClient
    from scratchllm.tokenizer.base import BaseTokenizer

SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class EvalExample:
    """One example to evaluate: its index in the data, the conversation and its texts."""

    index: int
    messages: tuple[dict[str, str], ...]  # up to and including the reference answer
    prompt: str  # instruction plus input (the book's format_input), or the conversation so far
    reference: str

    @property
    def key(self) -> str:
        """The resume key: index plus a hash of the prompt."""
        digest = hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()[:16]
        return f"{self.index}:{digest}"


# ---- data ------------------------------------------------------------------------------------


def split_records(records: Sequence[Any], split: str) -> list[tuple[int, Any]]:
    """(index, record) pairs of the book's split (data.instructions.split_book: 85% train, 10%
    test, 5% val, in file order), or of every record for "all"."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    indexed = list(enumerate(records))
    return indexed if split == "all" else split_book(indexed)[split]


def to_example(index: int, record: Any) -> EvalExample:
    """An EvalExample from an Alpaca record or a conversation (the last assistant reply)."""
    try:
        messages = to_messages(record)
    except UserError as e:
        raise UserError(f"example {index}: {e}") from e
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise UserError(f"example {index} has no assistant reply after a prompt: nothing to "
                        "compare against; give each conversation a final assistant message")
    messages = messages[:last + 1]
    if isinstance(record, Mapping) and "instruction" in record:
        user = messages[0]
        prompt = alpaca_text(user["instruction"], user["input"], "")
        prompt = prompt.removesuffix("\n\n### Response:\n")  # the book's format_input
    else:
        history = messages[:-1]
        prompt = history[0]["content"] if len(history) == 1 else \
            "\n\n".join(f"{m['role']}: {m['content']}" for m in history)
    return EvalExample(index, tuple(messages), prompt, messages[-1]["content"])


def load_examples(data: str, split: str | None = None, limit: int | None = None
                  ) -> list[EvalExample]:
    """Examples of a split (default: test for a named dataset, all for a file), maybe limited."""
    if split is None:
        split = "all" if Path(data).is_file() else "test"
    pairs = split_records(load_instructions(data), split)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        pairs = pairs[:limit]
    if not pairs:
        raise UserError(f"the {split} split of {data} is empty: use --split all or more data")
    return [to_example(i, record) for i, record in pairs]


# ---- model -----------------------------------------------------------------------------------


def _conversation(template: Template, example: EvalExample) -> Any:
    # The alpaca template renders the Alpaca fields (instruction and input kept apart).
    if template.name == "alpaca" and "instruction" in example.messages[0]:
        user = example.messages[0]
        return {"instruction": user["instruction"], "input": user.get("input", ""),
                "output": example.reference}
    return list(example.messages)


def response_loss(model: nn.Module, tokenizer: BaseTokenizer, template: Template | str,
                  example: EvalExample) -> tuple[float, int]:
    """(summed NLL, token count) of the reference response tokens given the prompt."""
    import torch

    from scratchllm.model import lm_loss_sum

    template = get_template(template) if isinstance(template, str) else template
    ids, mask = render(template, _conversation(template, example), tokenizer)
    # Only the final reply counts: the last run of learned tokens (earlier assistant turns of a
    # conversation are context here).
    start = len(mask)
    while start > 0 and mask[start - 1]:
        start -= 1
    mask = [False] * start + mask[start:]
    window = model.config.context_length + 1
    if len(ids) > window:  # keep the end: the response, and as much prompt as fits
        ids, mask = ids[-window:], mask[-window:]
    inputs, targets = shift(ids, mask)
    device = next(model.parameters()).device
    x = torch.tensor([inputs], dtype=torch.long, device=device)
    y = torch.tensor([targets], dtype=torch.long, device=device)
    with torch.no_grad():
        total, count = lm_loss_sum(model(x), y)
    return float(total), int(count)


def generate_response(model: nn.Module, tokenizer: BaseTokenizer, template: Template | str,
                      example: EvalExample, max_new_tokens: int) -> str:
    """The greedy reply to the example's prompt, stopped at the template's end token."""
    from scratchllm.generate import GenerationConfig, complete

    template = get_template(template) if isinstance(template, str) else template
    prompt_ids = render_prompt(template, _conversation(template, example), tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_ids=(tokenizer.special_tokens[template.end_token],),
                              truncate_prompt=True)
    return (complete(model, [prompt_ids], config, tokenizer)[0].text or "").strip()


# ---- results ---------------------------------------------------------------------------------


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """key -> latest record of an existing results file; a torn last line is dropped."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a crash mid-line: cut it so appends stay whole
        raw = raw[:raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    done: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[record["key"]] = record
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} line {n} is not an evaluate record: choose another --out "
                            "or remove the file") from e
    return done


@dataclass
class Summary:
    """Counts and means of one evaluation."""

    examples: int = 0
    generated: int = 0  # responses made in this run (the rest came from the results file)
    judged: int = 0  # judge calls made in this run
    loss_sum: float = 0.0
    loss_tokens: int = 0
    scores: list[int] = field(default_factory=list)
    invalid_scores: int = 0
    unscored: int = 0

    @property
    def mean_loss(self) -> float:
        """Response loss per reference token over all examples."""
        return self.loss_sum / self.loss_tokens if self.loss_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        """exp(mean response loss)."""
        return math.exp(self.mean_loss) if self.loss_tokens else float("nan")

    @property
    def mean_score(self) -> float | None:
        """Mean judge score over valid scores (None if there are none)."""
        return sum(self.scores) / len(self.scores) if self.scores else None

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one final record."""
        self.examples += 1
        self.loss_sum += record["response_loss"] * record["response_tokens"]
        self.loss_tokens += record["response_tokens"]
        if "judge_score" not in record:
            self.unscored += 1
        elif record["judge_score"] is None:
            self.invalid_scores += 1
        else:
            self.scores.append(record["judge_score"])


def evaluate(model: nn.Module, tokenizer: BaseTokenizer, template: Template | str,
             examples: Sequence[EvalExample], out: str | Path, max_new_tokens: int = 256,
             judge: JudgeClient | None = None,
             progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> Summary:
    """Evaluate examples into the JSONL `out`, reusing its finished records; the Summary."""
    template = get_template(template) if isinstance(template, str) else template
    out = Path(out)
    done = read_results(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    with out.open("a", encoding="utf-8") as f:
        for n, example in enumerate(examples, 1):
            record = done.get(example.key)
            changed = False
            if record is None:
                loss, count = response_loss(model, tokenizer, template, example)
                record = {"key": example.key, "index": example.index, "prompt": example.prompt,
                          "reference": example.reference,
                          "response": generate_response(model, tokenizer, template, example,
                                                        max_new_tokens),
                          "response_loss": loss / max(count, 1), "response_tokens": count}
                summary.generated += 1
                changed = True
            if judge is not None and "judge_score" not in record:
                try:
                    score, reply = judge.score(record["prompt"], record["reference"],
                                               record["response"])
                except UserError:  # keep the response: a rerun then only asks the judge
                    if changed:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    raise
                record = {**record, "judge_score": score, "judge_reply": reply,
                          "judge_model": judge.model}
                summary.judged += 1
                changed = True
            if changed:  # one whole line at a time, flushed: Ctrl-C loses at most this one
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
            summary.add(record)
            if progress is not None:
                progress(n, len(examples), record)
    return summary
