"""`scratchllm convert`: Hugging Face model directories to scratchllm checkpoints and back.

Both directions build the whole output in a temp directory beside --out and rename it into
place at the end, so a bad input or a crash never leaves a half-written directory behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchllm.errors import UserError
from scratchllm.fileio import read_json

if TYPE_CHECKING:
    from scratchllm.tokenizer import BaseTokenizer

DESCRIPTION = """Convert model weights between Hugging Face and scratchllm.
--from-hf DIR reads a Hugging Face model directory (config.json + model.safetensors, sharded or
not; GPT-2 and Llama families) and its tokenizer (tokenizer.json, or vocab.json + merges.txt)
into a scratchllm checkpoint directory. --to-hf --checkpoint CKPT writes the reverse, which
transformers' AutoModelForCausalLM and AutoTokenizer load. Pickle files (pytorch_model.bin) are
refused: only safetensors are read."""

DTYPES = ("float32", "bfloat16", "float16")


def register(commands: Any) -> argparse.ArgumentParser:
    """Add `scratchllm convert` to an argparse subparsers object; returns its parser."""
    p = commands.add_parser("convert", help="import Hugging Face weights, or export to them",
                            description=DESCRIPTION)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", type=Path, metavar="DIR",
                     help="a Hugging Face model directory to import")
    way.add_argument("--to-hf", action="store_true",
                     help="export --checkpoint to a Hugging Face model directory")
    p.add_argument("--checkpoint", type=Path, metavar="CKPT",
                   help="with --to-hf: the checkpoint or run directory to export")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the directory to write (must not exist, unless --overwrite)")
    p.add_argument("--tokenizer", type=Path, metavar="FILE",
                   help="with --from-hf: a tokenizer file (scratchllm's, or an HF "
                        "tokenizer.json) instead of the one in DIR")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype of the written weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    """Run one direction of the conversion and say what was written."""
    if args.to_hf:
        if args.checkpoint is None:
            raise UserError("--to-hf needs --checkpoint CKPT (a checkpoint or run directory)")
        if args.tokenizer is not None:
            raise UserError("--tokenizer goes with --from-hf: --to-hf exports the checkpoint's "
                            "own tokenizer")
        out = export_hf(args.checkpoint, args.out, args.dtype, args.overwrite)
        print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained"
              f"({str(out)!r}) and AutoTokenizer.from_pretrained({str(out)!r})")
        return 0
    if args.checkpoint is not None:
        raise UserError("--checkpoint goes with --to-hf; --from-hf writes the checkpoint --out")
    out = import_hf(args.from_hf, args.out, args.tokenizer, args.dtype, args.overwrite)
    print(f"wrote {out}: try `scratchllm generate --checkpoint {out} --prompt \"Hello\"`")
    return 0


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike,
              tokenizer: str | os.PathLike | None = None, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write the scratchllm checkpoint (weights, config, tokenizer) of an HF model directory."""
    from scratchllm.model.convert import from_hf, read_hf_config
    from scratchllm.runtime import torch_dtype

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory: download a model first, e.g. "
                        f"`huggingface-cli download gpt2 --local-dir {hf_dir}`")
    _check_out(out, overwrite)
    # The cheap checks first (config, weight files, tokenizer): bad input fails before
    # gigabytes of weights are read.
    read_hf_config(hf_dir)
    tok = _load_tokenizer(Path(tokenizer)) if tokenizer is not None else _hf_dir_tokenizer(hf_dir)
    model = from_hf(hf_dir).to(torch_dtype(dtype))
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                        f"{model.config.vocab_size} embeddings: pass the model's own tokenizer")
    with staged(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tok.save(tmp / "tokenizer.json")
    return out


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write an HF model directory (weights, config, tokenizer) from a scratchllm checkpoint."""
    from scratchllm.checkpoint import load_for_inference
    from scratchllm.data.chat import CHAT_SPECIALS, hf_chat_template
    from scratchllm.model.convert import to_hf
    from scratchllm.tokenizer import Tokenizer

    out = Path(out)
    _check_out(out, overwrite)
    model, tok = load_for_inference(checkpoint, "cpu", dtype)
    if not isinstance(tok, Tokenizer):
        raise UserError(f"the checkpoint's tokenizer is a {tok.kind!r} tokenizer, which has no "
                        "Hugging Face equivalent: export needs a byte-level BPE")
    with staged(out, overwrite) as tmp:
        to_hf(model, tmp, _hf_special_ids(tok, model.config.pos_encoding == "learned"))
        tok.export_hf(tmp / "tokenizer.json")
        tok_config = _tokenizer_config(tok, model.config)
        if all(t in tok.special_tokens for t in CHAT_SPECIALS):  # the chat template's tokens
            tok_config["chat_template"] = hf_chat_template("chat")
        _write_json(tmp / "tokenizer_config.json", tok_config)
    return out


# ---- tokenizers ----------------------------------------------------------------------------


def _load_tokenizer(path: Path) -> BaseTokenizer:
    """A tokenizer file given with --tokenizer: scratchllm's own format or an HF tokenizer.json."""
    from scratchllm.tokenizer import load_tokenizer
    from scratchllm.tokenizer.base import FORMAT_NAME
    from scratchllm.tokenizer.hf import load_hf_tokenizer

    head = read_json(path, "give --tokenizer a tokenizer.json (scratchllm's or HF's)")
    if isinstance(head, dict) and head.get("format") != FORMAT_NAME and "model" in head:
        return load_hf_tokenizer(path)
    return load_tokenizer(path)


def _hf_dir_tokenizer(hf_dir: Path) -> BaseTokenizer:
    """The tokenizer of an HF model directory: tokenizer.json, else vocab.json + merges.txt."""
    from scratchllm.tokenizer.hf import load_hf_tokenizer, load_hf_vocab_merges

    if (hf_dir / "tokenizer.json").is_file():
        return load_hf_tokenizer(hf_dir / "tokenizer.json")
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        return load_hf_vocab_merges(hf_dir / "vocab.json", hf_dir / "merges.txt")
    raise UserError(f"no tokenizer in {hf_dir} (tokenizer.json, or vocab.json + merges.txt): "
                    "download it with the model, or pass --tokenizer FILE")


# Names of the end-of-text / beginning-of-text tokens in the tokenizers we know (ours and
# GPT-2's first, then Llama 3's).
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>")
BOS_NAMES = ("<|begin_of_text|>",)


def _first(tok: BaseTokenizer, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in tok.special_tokens), None)


def _hf_special_ids(tok: BaseTokenizer, gpt2: bool) -> dict[str, int | None]:
    """bos/eos ids for config.json (GPT-2 uses <|endoftext|> for both)."""
    eos, bos = _first(tok, EOS_NAMES), _first(tok, BOS_NAMES)
    eos_id = tok.special_tokens[eos] if eos else None
    bos_id = tok.special_tokens[bos] if bos else (eos_id if gpt2 else None)
    return {"bos_token_id": bos_id, "eos_token_id": eos_id}


def _tokenizer_config(tok: BaseTokenizer, config: Any) -> dict[str, Any]:
    """A tokenizer_config.json with which AutoTokenizer loads our exported tokenizer.json."""
    names = {"eos_token": _first(tok, EOS_NAMES), "bos_token": _first(tok, BOS_NAMES),
             "pad_token": _first(tok, ("<|pad|>",)), "unk_token": _first(tok, ("<|unk|>",))}
    added = {str(i): {"content": name, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True}
             for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
            config.context_length, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
            **{k: v for k, v in names.items() if v is not None}}


# ---- writing -------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    from scratchllm.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _check_out(out: Path, overwrite: bool) -> None:
    """Fail early, before any work, if --out is taken."""
    if out.is_file():
        raise UserError(f"--out {out} is a file: give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty: choose another path or "
                        "pass --overwrite")


@contextmanager
def staged(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temp directory beside `out` that becomes `out` when the block succeeds.

    On any failure (or Ctrl-C) the temp directory is deleted and `out` is left as it was. With
    `overwrite`, an existing `out` is moved aside first and deleted only after the rename.
    """
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:  # put the previous directory back
                os.replace(old / out.name, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
