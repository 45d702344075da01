"""`scratchllm train-seq2seq` and `scratchllm translate` (alias `summarize`): the
encoder-decoder."""

import argparse
import json
import sys
from pathlib import Path

from scratchllm.errors import UserError
from scratchllm.fileio import read_utf8

TRAIN_NEXT = """next:
  scratchllm translate --checkpoint {run} "{example}"
  scratchllm translate --checkpoint {run} --score test --beams 4   # the held-out test split
  scratchllm plot {run}"""


def register_train(commands) -> None:
    """Add `scratchllm train-seq2seq`."""
    p = commands.add_parser(
        "train-seq2seq", help="train an encoder-decoder (translation, summarization)",
        description="Train an encoder-decoder transformer on (source, target) pairs: a named "
                    "set (tatoeba-fra-eng, tatoeba-deu-eng, tico19-en-fr, gutenberg-lead), "
                    "SOURCE_FILE,TARGET_FILE, a .tsv/.jsonl/.tmx file or hf:NAME; '+' joins "
                    "several. Every config key can be overridden as --section.key=value "
                    "(sections: seq2seq, model, train, optim, eval, checkpoint), e.g. "
                    "--model.preset=transformer-base --optim.warmup_steps=4000.")
    p.add_argument("--config", type=Path, help="TOML config (presets: configs/seq2seq-*.toml)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--task", choices=("translate", "summarize"),
                   help="translate (BLEU, chrF; default) or summarize (ROUGE)")
    p.add_argument("--data", help="the pairs (default: tatoeba-fra-eng+tico19-en-fr, or "
                                  "gutenberg-lead for summarize)")
    p.add_argument("--source-lang", help="source language of a named set or TMX, e.g. fr")
    p.add_argument("--target-lang", help="target language, e.g. en")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (= train.max_steps)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|DIR",
                   help="continue the run in --out (auto) or from a run or checkpoint directory")
    p.set_defaults(handler=cmd_train, accepts_overrides=True)


def register_translate(commands) -> None:
    """Add `scratchllm translate` (and its alias `summarize`)."""
    p = commands.add_parser(
        "translate", aliases=["summarize"], help="translate (or summarize) with a seq2seq model",
        description="Decode texts with a model trained by `scratchllm train-seq2seq`: the "
                    "arguments, --file (one text per line) or stdin, one output per line. "
                    "Greedy by default; --beams N runs beam search. --score DATA decodes the "
                    "sources of a data spec (or 'test', the run's held-out split) and prints "
                    "BLEU and chrF (translation) or ROUGE (summarization).")
    p.add_argument("--checkpoint", required=True, type=Path, help="seq2seq run or checkpoint")
    p.add_argument("texts", nargs="*", help="texts to translate")
    p.add_argument("--file", type=Path, help="one text per line")
    p.add_argument("--beams", type=int, default=1, metavar="N", help="beam search with N beams")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                   help="beam score = log-prob / length**A")
    p.add_argument("--max-length-ratio", type=float, metavar="R",
                   help="output at most R * source tokens + --max-length-extra (default: the "
                        "run's settings)")
    p.add_argument("--max-length-extra", type=int, metavar="N")
    p.add_argument("--score", metavar="DATA",
                   help="score against references: 'test' (the run's held-out split) or a "
                        "data spec such as pairs.tsv")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="--score: first N pairs")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps (default: auto)")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"),
                   help="weights (default float32)")
    p.add_argument("--json", action="store_true", help="one JSON object per text (or score)")
    p.set_defaults(handler=cmd_translate)


def cmd_train(args: argparse.Namespace) -> int:
    from scratchllm.config import load_config
    from scratchllm.train.seq2seq import Seq2SeqTrainConfig, seq2seq_trainer

    overrides = []
    for flag, key in (("task", "seq2seq.task"), ("data", "seq2seq.data"),
                      ("source_lang", "seq2seq.source_lang"),
                      ("target_lang", "seq2seq.target_lang"), ("max_steps", "train.max_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"--{key}={getattr(args, flag)}")
    config = load_config(args.config, overrides + list(args.overrides), Seq2SeqTrainConfig)
    loop = seq2seq_trainer(config, args.out, resume=args.resume, progress=sys.stderr.isatty(),
                           log=lambda message: print(message, file=sys.stderr))
    result = loop.run()
    scores = {k: v for k, v in result.last_eval.items() if k.startswith("val_")}
    if scores:
        print("validation: " + ", ".join(f"{k[4:]} {v:.2f}" for k, v in scores.items()))
    if result.interrupted:
        print(f"stopped at step {result.step}; resume with --resume", file=sys.stderr)
        return 130
    samples = result.last_eval.get("samples") or [{"source": "Bonjour !"}]
    print(TRAIN_NEXT.format(run=args.out, example=samples[0]["source"].replace('"', "'")))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from scratchllm.train.seq2seq import load_seq2seq, run_settings, task_metrics, translate

    if args.beams < 1:
        raise UserError(f"--beams must be >= 1, got {args.beams}")
    settings = run_settings(args.checkpoint)
    texts, refs = list(args.texts), None
    if args.score is not None:
        if texts or args.file:
            raise UserError("--score decodes its own sources: drop the texts and --file")
        texts, refs = _score_pairs(args, settings)
    if args.file is not None:
        text = read_utf8(args.file, "give --file a UTF-8 text file, one text per line")
        texts += [line for line in text.splitlines() if line.strip()]
    if not texts and args.score is None:
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise UserError("no texts to translate: give them as arguments, with --file or on stdin")
    model, tokenizer = load_seq2seq(args.checkpoint, args.device, args.dtype)
    ratio = args.max_length_ratio if args.max_length_ratio is not None \
        else settings.get("max_length_ratio", 1.5)
    extra = args.max_length_extra if args.max_length_extra is not None \
        else settings.get("max_length_extra", 10)
    outputs = translate(model, tokenizer, texts, args.beams, args.length_penalty, ratio, extra,
                        settings.get("max_source_len", 0))
    if refs is None:
        for text, output in zip(texts, outputs, strict=True):
            print(json.dumps({"source": text, "output": output}, ensure_ascii=False)
                  if args.json else output)
        return 0
    scores = task_metrics(settings.get("task", "translate"), outputs, refs)
    if args.json:
        print(json.dumps({"pairs": len(refs), "beams": args.beams, **scores}))
    else:
        print(f"{len(refs)} pairs, {args.beams} beam(s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return 0


def _score_pairs(args: argparse.Namespace, settings: dict) -> tuple[list[str], list[str]]:
    from scratchllm.data.parallel import read_pairs, read_tsv
    from scratchllm.train.seq2seq import run_data_dir

    if args.score == "test":
        pairs = read_tsv(run_data_dir(args.checkpoint) / "test.tsv")
    else:
        pairs = read_pairs(args.score, settings.get("source_lang", ""),
                           settings.get("target_lang", ""),
                           settings.get("source_field", "source"),
                           settings.get("target_field", "target"))
    if args.limit:
        pairs = pairs[:args.limit]
    return [s for s, _ in pairs], [t for _, t in pairs]
