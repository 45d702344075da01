"""Helpers shared by the command modules (argparse only: no torch at parser-build time)."""

import argparse
import sys
from collections.abc import Sequence

from scratchllm.errors import UserError


def command_group(commands, name: str, help_text: str):
    """A command with subcommands (`scratchllm NAME COMMAND`); alone it prints its help."""
    group = commands.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
    group.set_defaults(handler=lambda _: group.print_help() or 2)
    return group.add_subparsers(title=f"{name} commands", metavar="COMMAND")


def load_texts(sources: Sequence[str]) -> list[str]:
    """Every text of the sources, or a UserError when there is none."""
    from scratchllm.data import texts_from_source

    texts = [text for source in sources for text in texts_from_source(source)]
    if not any(text.strip() for text in texts):
        raise UserError(f"the corpus {', '.join(sources)} is empty (no text to train on)")
    return texts


def sample_corpus(sources: Sequence[str], max_chars: int, allow_binary: bool = False
                  ) -> tuple[list[str], str]:
    """At most max_chars characters of the sources, sampled evenly; and a note if sampled."""
    from scratchllm.data import SourceOptions
    from scratchllm.data.sources import SEGMENT_CHARS, sample_texts

    if max_chars < 1:
        raise UserError(f"--max-chars must be at least 1, got {max_chars}")
    texts, total = sample_texts(sources, max_chars, SourceOptions(allow_binary=allow_binary))
    if not any(text.strip() for text in texts):
        if texts or not total:
            raise UserError(f"the corpus {', '.join(sources)} is empty (no text to train on)")
        raise UserError(f"--max-chars {max_chars:,} is smaller than any piece of the corpus "
                        f"(up to {2 * SEGMENT_CHARS:,} characters): raise it")
    kept = sum(map(len, texts))
    note = "" if kept == total else (
        f" (sampled evenly from {total:,} characters; --max-chars {max_chars:,})")
    return texts, note


def read_text(args: argparse.Namespace) -> str:
    """The text of --text, --file or stdin."""
    from scratchllm.data import read_text_file

    if args.text is not None:
        return args.text
    if args.file is not None:
        return read_text_file(args.file)[0]
    return sys.stdin.read()
