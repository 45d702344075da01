"""Read Hugging Face byte-level BPE tokenizers: `tokenizer.json`, or `vocab.json` + `merges.txt`.

Our Tokenizer encodes by tiktoken's rule (merge the adjacent pair whose concatenation has the
lowest id); HF's BPE merges the pair listed first in `merges`. The two agree when every
ordinary token is a byte-level string, merge k makes a token whose id never decreases with k,
the special (added) tokens come after the ordinary ones, and the text reaches BPE unchanged
(no normalizer, no prefix space). GPT-2's files and tiktoken-made ones (Llama 3, our own
export) are like that; anything else is refused with a UserError rather than turned into a
tokenizer that gives other ids. HF post-processors (e.g. Llama 3 prepending <|begin_of_text|>
when asked to add special tokens) are not ours: `encode` gives the ids of the text alone.
"""

import os
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError
from scratchllm.fileio import read_json_object
from scratchllm.tokenizer.base import ENDOFTEXT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.bytelevel import str_to_bytes
from scratchllm.tokenizer.pretokenize import GPT2_PATTERN

HINT = "pass a scratchllm tokenizer with --tokenizer"


class _Unsupported(Exception):
    """A tokenizer feature our BPE cannot reproduce exactly (the message says which)."""


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Our Tokenizer from an HF `tokenizer.json` of a byte-level BPE (GPT-2, Llama 3 style)."""
    path = Path(path)
    data = _read_json(path)
    return hf_tokenizer_from_dict(data, path)


def load_hf_vocab_merges(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                         added_tokens: list[dict[str, Any]] | None = None) -> Tokenizer:
    """Our Tokenizer from GPT-2-style `vocab.json` + `merges.txt` (GPT-2's pattern).

    added_tokens: HF added-token dicts ({"id", "content", ...}); by default those in a
    `tokenizer_config.json` beside vocab.json, else <|endoftext|> if the vocabulary has it.
    """
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    vocab = _read_json(vocab_json)
    if not merges_txt.is_file():
        raise UserError(f"{merges_txt} not found: GPT-2-style tokenizers need vocab.json and "
                        "merges.txt side by side")
    try:
        lines = merges_txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{merges_txt} is not UTF-8 text ({e}): {HINT}") from None
    merges = [line for line in lines if line.strip() and not line.startswith("#version")]
    if added_tokens is None:
        added_tokens = _added_from_config(vocab_json.parent / "tokenizer_config.json")
    if added_tokens is None:
        added_tokens = [{"id": vocab[ENDOFTEXT], "content": ENDOFTEXT}] \
            if ENDOFTEXT in vocab else []
    data = {"added_tokens": added_tokens, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    return hf_tokenizer_from_dict(data, vocab_json)


def hf_tokenizer_from_dict(data: dict[str, Any],
                           source: str | os.PathLike = "tokenizer.json") -> Tokenizer:
    """Our Tokenizer from the parsed content of an HF tokenizer.json (see the module doc).

    source: the file named in error messages.
    """
    return _convert(Path(source), lambda: _from_dict(data))


def _from_dict(data: dict[str, Any]) -> Tokenizer:
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        kind = model.get("type") if isinstance(model, dict) else None
        raise _Unsupported(f"its model is {kind!r}, not a BPE")
    if model.get("byte_fallback"):
        raise _Unsupported("byte_fallback is set (a SentencePiece-style BPE, not byte-level)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _Unsupported(f"{key} is {model[key]!r}")
    if model.get("dropout"):
        raise _Unsupported("BPE dropout is set")
    if not _is_none(data.get("normalizer")):
        raise _Unsupported(f"it normalizes text first ({_kind(data['normalizer'])})")
    pattern = _pattern(data.get("pre_tokenizer"))
    decoder = data.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise _Unsupported(f"its decoder is {_kind(decoder)}, not ByteLevel")

    added = data.get("added_tokens") or []
    for token in added:
        flags = [k for k in ("lstrip", "rstrip", "single_word") if token.get(k)]
        if flags:
            raise _Unsupported(f"added token {token['content']!r} has {', '.join(flags)}")
    # HF matches every added token in the text; ours are special tokens (allowed_special).
    specials = {str(t["content"]): int(t["id"]) for t in added}
    table: dict[str, int] = model["vocab"]
    ordinary = {s: int(i) for s, i in table.items() if s not in specials}
    for s, i in table.items():
        if s in specials and specials[s] != int(i):
            raise _Unsupported(f"added token {s!r} has id {specials[s]} but {i} in the vocab")
    n = len(ordinary)
    if sorted(ordinary.values()) != list(range(n)):
        raise _Unsupported("its ordinary token ids are not 0..N-1 without gaps")
    if specials and sorted(specials.values()) != list(range(n, n + len(specials))):
        raise _Unsupported(f"its added tokens do not take ids {n}..{n + len(specials) - 1}, "
                           "right after the ordinary tokens")
    vocab: list[bytes] = [b""] * n
    for s, i in ordinary.items():
        try:
            vocab[i] = str_to_bytes(s)
        except KeyError:
            raise _Unsupported(f"token {i} ({s!r}) is not a byte-level string") from None

    merges: list[tuple[int, int]] = []
    last = -1
    for k, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left not in ordinary or right not in ordinary:
            raise _Unsupported(f"merge {k} ({left!r}, {right!r}) names a token not in the vocab")
        made = ordinary.get(left + right)
        if made is None:
            raise _Unsupported(f"merge {k} ({left!r}, {right!r}) makes no token in the vocab")
        # tiktoken's rule ranks pairs by the id they make: merges must be in that order.
        if made < last:
            raise _Unsupported(f"merge {k} ({left!r}, {right!r}) makes id {made} after a merge "
                               f"made id {last}: merges are not in id order")
        last = made
        merges.append((ordinary[left], ordinary[right]))
    tok = Tokenizer(vocab, merges, specials, pattern)
    tok.fast  # noqa: B018 -- compile the pattern now: a regex tiktoken rejects fails here
    return tok


def _pattern(pre: dict[str, Any] | None) -> str:
    """The split regex of a byte-level pre-tokenizer (ByteLevel, or Split + ByteLevel)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if steps and steps[-1] and steps[-1].get("type") == "ByteLevel":
        byte_level = steps[-1]
        if byte_level.get("add_prefix_space"):
            raise _Unsupported("its ByteLevel pre-tokenizer adds a prefix space")
        use_regex = byte_level.get("use_regex", True)
        if len(steps) == 1 and use_regex:
            return GPT2_PATTERN  # ByteLevel's built-in regex is GPT-2's
        split = steps[0] if len(steps) == 2 else None
        if split and not use_regex and split.get("type") == "Split" \
                and "Regex" in (split.get("pattern") or {}) \
                and split.get("behavior") == "Isolated" and not split.get("invert"):
            return str(split["pattern"]["Regex"])
    raise _Unsupported(f"its pre-tokenizer ({_kind(pre)}) is not ByteLevel or Split(regex, "
                       "Isolated) + ByteLevel")


def _is_none(step: Any) -> bool:
    return step is None or (step.get("type") == "Sequence" and not step.get("normalizers"))


def _kind(step: Any) -> str:
    if not isinstance(step, dict):
        return repr(step)
    inner = step.get("pretokenizers") or step.get("normalizers") or step.get("decoders")
    if step.get("type") == "Sequence" and inner:
        return "Sequence of " + ", ".join(str(s.get("type")) for s in inner)
    return str(step.get("type"))


def _added_from_config(path: Path) -> list[dict[str, Any]] | None:
    """The added tokens a tokenizer_config.json lists (transformers >= 4.34), if any."""
    if not path.is_file():
        return None
    decoder = _read_json(path).get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return None
    try:
        return [{**token, "id": int(i)} for i, token in decoder.items()]
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a malformed added_tokens_decoder ({e}): {HINT}") from None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, f"re-download it or {HINT}")


def _convert(path: Path, build) -> Tokenizer:
    """Run build(), turning every failure into a one-line UserError that names `path`."""
    try:
        return build()
    except (_Unsupported, UserError) as e:  # UserError: our Tokenizer's own checks
        raise UserError(f"{path} cannot be converted exactly: {e}; {HINT}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{path} is not a valid Hugging Face tokenizer file "
                        f"({type(e).__name__}: {e}); {HINT}") from None
