"""`scratchllm evaluate`: responses, response loss and judge scores for an instruction split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError

DESCRIPTION = """Evaluate an instruction-tuned checkpoint on a split of instruction data.
Writes one JSON line per example to --out (prompt, reference, the greedy response, the
response loss) and prints the mean response loss and perplexity. With --judge-url and
--judge-model, an OpenAI-compatible server (Ollama, llama.cpp, vLLM...) scores each response
0-100 with the book's prompt. Rerunning with the same --out skips finished examples."""


def register(commands: Any) -> argparse.ArgumentParser:
    """Add `scratchllm evaluate` to an argparse subparsers object; returns its parser."""
    p = commands.add_parser("evaluate", help="score an instruction model's responses",
                            description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint directory or run directory (its newest checkpoint)")
    p.add_argument("--data", default="instruction-data",
                   help="dataset name, hf:NAME, or a .json/.jsonl file of Alpaca records or "
                        "{\"messages\": [...]} conversations (default: instruction-data)")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="the book's 85/10/5 split in file order (default: test for a named "
                        "dataset, all for a file)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl",
                   help="results, one JSON line per example (appended to when rerun)")
    p.add_argument("--template", help="alpaca or chat (default: the checkpoint's template)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N examples")
    p.add_argument("--judge-url", metavar="URL",
                   help="OpenAI-compatible base URL, e.g. http://localhost:11434/v1")
    p.add_argument("--judge-model", metavar="NAME", help="the judge's model name")
    p.add_argument("--judge-api-key", metavar="KEY", help="sent as a Bearer token if given")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps... (default: auto)")
    p.add_argument("--dtype", default="float32",
                   choices=("auto", "float32", "bfloat16", "float16"))
    p.set_defaults(handler=cmd_evaluate)
    return p


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, template name): --template, else the checkpoint's template.json."""
    from scratchllm.checkpoint import load_chat_model

    model, tokenizer, template = load_chat_model(args.checkpoint, args.device, args.dtype)
    template = args.template or template
    if template is None:
        raise UserError(f"{args.checkpoint} does not say which prompt template it was tuned "
                        "with (no template.json): pass --template alpaca or --template chat")
    return model, tokenizer, template


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Generate, score and summarise; the results file grows one line per finished example."""
    from scratchllm.data.chat import get_template
    from scratchllm.evaluate.judge import JudgeClient
    from scratchllm.evaluate.responses import evaluate, load_examples

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if (args.judge_url is None) != (args.judge_model is None):
        raise UserError("give --judge-url and --judge-model together (or neither)")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory: give a .jsonl file path")
    judge = None if args.judge_url is None else \
        JudgeClient(args.judge_url, args.judge_model, args.judge_api_key)
    examples = load_examples(args.data, args.split, args.limit)
    model, tokenizer, template = _load_model(args)
    template = get_template(template)

    pending = [False]  # a progress line without its newline yet

    def progress(n: int, total: int, record: dict[str, Any]) -> None:
        score = record.get("judge_score", "-")
        pending[0] = n < total
        print(f"\r[{n}/{total}] loss {record['response_loss']:.3f} score {score}   ",
              end="" if n < total else "\n", file=sys.stderr, flush=True)

    try:
        s = evaluate(model, tokenizer, template, examples, args.out, args.max_new_tokens,
                     judge, progress)
    finally:
        if pending[0]:  # an error or Ctrl-C then starts on a line of its own
            print(file=sys.stderr)
    print(f"examples: {s.examples} ({s.generated} generated now, "
          f"{s.examples - s.generated} from {args.out})")
    print(f"response loss: {s.mean_loss:.4f}  perplexity: {s.perplexity:.2f}  "
          f"({s.loss_tokens} reference tokens)")
    if s.examples - s.unscored or judge is not None:
        mean = "n/a" if s.mean_score is None else f"{s.mean_score:.2f}"
        print(f"judge score: {mean} mean over {len(s.scores)} valid "
              f"({s.invalid_scores} invalid, {s.unscored} not scored, {s.judged} judged now)")
    print(f"results: {args.out}")
    return 0
