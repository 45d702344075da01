"""`scratchllm generate`: sample text from a checkpoint, streamed as it forms, or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError
from scratchllm.fileio import read_utf8

DESCRIPTION = """Generate text from a checkpoint (or a run directory: its newest checkpoint).
The prompt comes from --prompt, --prompt-file or stdin. Output streams as it is generated;
--json prints one JSON object with the texts, token counts and timings instead.
Temperature 0 is greedy decoding; --beams N runs beam search (deterministic)."""


def register(commands: Any) -> argparse.ArgumentParser:
    """Add `scratchllm generate` to an argparse subparsers object; returns its parser."""
    p = commands.add_parser("generate", help="generate text from a checkpoint",
                            description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint directory or run directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text (default: read stdin)")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus: smallest set with prob. P")
    p.add_argument("--min-p", type=float, metavar="P",
                   help="drop tokens below P times the likeliest token's probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages tokens already in the prompt or output")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="subtract F times each token's count in the output")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="subtract P from every token already in the output")
    p.add_argument("--beams", type=int, default=1, metavar="N", help="beam search with N beams")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                   help="beam score = log-prob / length**A (> 0 favours longer outputs)")
    p.add_argument("--early-stopping", action="store_true",
                   help="beam search: stop as soon as N beams have finished")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when this text appears (not printed); repeatable")
    p.add_argument("--ignore-eot", action="store_true",
                   help="keep going past <|endoftext|> (by default it ends the sample)")
    p.add_argument("--seed", type=int, help="make sampling reproducible (sample i uses seed+i)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the last context_length tokens of a longer prompt")
    p.add_argument("--context-policy", choices=("slide", "stop"), default="slide",
                   help="past the context length: slide the window (default) or stop")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: auto)")
    p.add_argument("--dtype", default="float32",
                   choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and KV cache (default float32; auto = bfloat16 on CUDA and on "
                        "CPUs with native bf16, else float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    p.set_defaults(handler=cmd_generate)
    return p


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        return read_utf8(args.prompt_file, "give --prompt-file a UTF-8 text file")
    return sys.stdin.read()


def cmd_generate(args: argparse.Namespace) -> int:
    """Load the checkpoint, encode the prompt, print each sample (streamed or as JSON)."""
    from scratchllm.checkpoint import load_for_inference
    from scratchllm.generate import GenerationConfig
    from scratchllm.generate.api import complete, stream
    from scratchllm.generate.engine import fit_prompt

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.beams > 1 and args.num_samples > 1:
        raise UserError("beam search is deterministic, so every sample would be the same: "
                        "use --num-samples 1 with --beams")
    model, tokenizer = load_for_inference(args.checkpoint, args.device, args.dtype)
    prompt = _read_prompt(args)
    ids = tokenizer.encode(prompt, allowed_special="all")
    if not ids:  # an empty prompt starts a new document
        if "<|endoftext|>" not in tokenizer.special_tokens:
            raise UserError("the prompt is empty: give some text with --prompt")
        ids = [tokenizer.eot_id]
    fit_prompt(ids, model, args.truncate_prompt)  # a bad prompt fails before any output
    stop_ids = () if args.ignore_eot or "<|endoftext|>" not in tokenizer.special_tokens \
        else (tokenizer.eot_id,)
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        num_beams=args.beams, length_penalty=args.length_penalty,
        early_stopping=args.early_stopping, stop_ids=stop_ids, stop_strings=tuple(args.stop),
        truncate_prompt=args.truncate_prompt, context_policy=args.context_policy)
    configs = [GenerationConfig(**options, seed=None if args.seed is None else args.seed + i)
               for i in range(args.num_samples)]

    results = []
    for i, config in enumerate(configs):
        if args.json:
            results += complete(model, [ids], config, tokenizer)
            continue
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---", flush=True)
        pieces = stream(model, tokenizer, ids, config=config, out=results)
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()  # the stats go to stderr: keep them after the text
        done = results[-1]
        print(f"[{len(done.ids)} tokens, {done.tokens_per_s:.1f} tokens/s, "
              f"first token {done.time_to_first_token_s * 1000:.0f} ms, "
              f"finish: {done.finish_reason}]", file=sys.stderr)
    sys.stdout.flush()
    if args.json:
        print(json.dumps(_report(args, prompt, results, options), ensure_ascii=False, indent=2))
    return 0


def _report(args: argparse.Namespace, prompt: str, results: list, options: dict) -> dict:
    """The --json output: prompt, samples with counts and timings, and the options used."""
    return {
        "checkpoint": str(args.checkpoint),
        "prompt": prompt,
        "prompt_tokens": len(results[0].prompt_ids),
        "samples": [{"text": r.text, "new_tokens": len(r.ids), "finish_reason": r.finish_reason,
                     "time_to_first_token_s": round(r.time_to_first_token_s, 6),
                     "total_s": round(r.total_s, 6), "tokens_per_s": round(r.tokens_per_s, 3),
                     **({"score": r.score} if r.score is not None else {})}
                    for r in results],
        "options": {**options, "stop_ids": list(options["stop_ids"]),
                    "stop_strings": list(options["stop_strings"]), "seed": args.seed},
    }
