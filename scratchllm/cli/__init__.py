"""The `scratchllm` command: one entry point, each command a thin function over the library.

One module per command group; each has `register(subparsers)` and imports the library (and
torch) only inside its handlers, so building the parser (`--help`) stays fast.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

from scratchllm import __version__
from scratchllm.cli import (
    chat,
    convert,
    data,
    evaluate,
    finetune,
    generate,
    seq2seq,
    serve,
    tokenizer,
    train,
)
from scratchllm.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]

# Command -> the function that adds its parser (and, through set_defaults, its handler), in
# the order `--help` lists them. A new stage adds a module and a line here.
COMMANDS: dict[str, Callable] = {
    "tokenizer": tokenizer.register,
    "prepare": data.register_prepare,
    "data": data.register_data,
    "pretrain": train.register_pretrain,
    "plot": train.register_plot,
    "plan": train.register_plan,
    "generate": generate.register,
    "convert": convert.register,
    "finetune": finetune.register_finetune,
    "classify": finetune.register_classify,
    "merge": finetune.register_merge,
    "evaluate": evaluate.register,
    "chat": chat.register,
    "train-seq2seq": seq2seq.register_train,
    "translate": seq2seq.register_translate,
    "serve": serve.register,
}


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
    for register in COMMANDS.values():
        register(commands)
    return parser


