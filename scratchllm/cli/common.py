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


def read_text(args: argparse.Namespace) -> str:
    """The text of --text, --file or stdin."""
    from scratchllm.data import read_text_file

    if args.text is not None:
        return args.text
    if args.file is not None:
        return read_text_file(args.file)[0]
    return sys.stdin.read()
