"""`scratchllm tokenizer train|encode|decode|stats|export-hf|import-gpt2`."""

import argparse
import json
import sys
from pathlib import Path

from scratchllm.cli.common import command_group, load_texts, read_text, sample_corpus
from scratchllm.errors import UserError


def register(commands) -> None:
    """Add `scratchllm tokenizer ...`."""
    sub = command_group(commands, "tokenizer", "train, use and inspect tokenizers")

    p = sub.add_parser("train", help="train a byte-level BPE (or character) tokenizer",
                       description="Train a tokenizer on a corpus and save it as JSON.")
    p.add_argument("--data", action="append", required=True, metavar="SOURCE",
                   help="'shakespeare' (the default corpus), a file, a directory, a dataset name "
                        "or hf:NAME[:CONFIG][@SPLIT], as for prepare; repeat to combine")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="total ids, special tokens included (default 4096; ignored by --char)")
    p.add_argument("--out", required=True, type=Path, help="tokenizer JSON file to write")
    p.add_argument("--pattern", default="gpt4",
                   help="pre-tokenization regex: 'gpt4' (default), 'gpt2', or a regex")
    p.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="extra special token, e.g. '<|user|>' (repeatable); <|endoftext|>, "
                        "<|pad|> and <|unk|> are always added")
    p.add_argument("--char", action="store_true", help="train a character-level tokenizer")
    p.add_argument("--max-chars", type=int, default=100_000_000, metavar="N",
                   help="train on at most N characters of text (default 100,000,000, about "
                        "100 MB), sampled evenly across the whole corpus, which is read once; "
                        "memory stays at about this much text")
    p.add_argument("--allow-binary", action="store_true",
                   help="read files that look binary anyway (NUL bytes near the start, or more "
                        "than 1%% of bytes not UTF-8); bad bytes become U+FFFD")
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


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from scratchllm.tokenizer import CharTokenizer, Tokenizer

    if not args.char:
        Tokenizer.check_vocab_size(args.vocab_size, args.special)  # before the slow part
    texts, sampled = sample_corpus(args.data, args.max_chars, args.allow_binary)
    n_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
    print(f"training on {len(texts)} texts, {n_bytes / 1e6:.2f} MB{sampled}", file=sys.stderr)
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
    ids = tok.encode(read_text(args), allowed_special="all" if args.allow_special else ())
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
    text = "\n\n".join(load_texts([args.data])) if args.data else None
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
