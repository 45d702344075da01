"""The token shard format: what `prepare` writes and loaders read, and nothing of the pipeline.

A shard directory holds:
    train.bin, val.bin   token ids, one after another (uint16 if the vocabulary fits, else
                         uint32), documents separated by <|endoftext|>; read with np.memmap
    tokenizer.json       a copy of the tokenizer that made the shards
    meta.json            dtype, token and document counts per split, the tokenizer (its file,
                         relative to the directory, and fingerprint), the sources, the options

Every path in meta.json that names a file of the directory is relative to it, so a shard
directory can be moved or copied elsewhere and still works. meta.json files written before
the tokenizer copy name the tokenizer by an absolute path; those are still read.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text
from scratchllm.tokenizer import BaseTokenizer

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
META_FORMAT = "scratchllm-shards"
META_VERSION = 1
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends token ids to a temp file, hashing as it goes; commit renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")
        self.digest = hashlib.sha256()
        self.tokens = self.documents = self.segments = 0
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def write(self, ids: np.ndarray, segments: int = 0, documents: int = 0) -> None:
        """Append ids (already of the shard's dtype) that hold `segments` and `documents`."""
        self.pending.append(ids)
        self.segments += segments
        self.documents += documents
        self.tokens += len(ids)
        self.pending_tokens += len(ids)
        if self.pending_tokens >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        """Write the buffered ids (one write and one hash update per ~million tokens)."""
        if self.pending:
            data = np.concatenate(self.pending).tobytes()
            self.file.write(data)
            self.digest.update(data)
            self.pending, self.pending_tokens = [], 0

    def commit(self) -> None:
        """Write what is left, fsync, and rename the temp file to the real name."""
        self.flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Close and delete the temp file (nothing left after a commit)."""
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def read_meta(out_dir: str | Path, missing_ok: bool = False) -> dict | None:
    """Read DIR/meta.json; a UserError if it is missing (unless missing_ok) or not ours."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise UserError(f"{path} does not exist: run `scratchllm prepare --out {out_dir}` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt; re-run `scratchllm prepare --force`") from None
    if (not isinstance(meta, dict) or meta.get("format") != META_FORMAT
            or meta.get("version") != META_VERSION):
        raise UserError(f"{path} is not scratchllm shard metadata version {META_VERSION}; "
                        "re-run `scratchllm prepare --force`")
    return meta


def write_meta(out_dir: str | Path, meta: dict) -> None:
    """Write DIR/meta.json atomically (after the shards and the tokenizer it describes)."""
    atomic_write_text(Path(out_dir) / META_FILE, json.dumps(meta, indent=1) + "\n")


def shards_ok(out_dir: str | Path, meta: dict) -> bool:
    """Whether every split's file exists with the size meta.json gives it."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        path = Path(out_dir) / split["file"]
        if not path.is_file() or path.stat().st_size != split["tokens"] * itemsize:
            return False
    return True


def check_shards(out_dir: str | Path, tokenizer: BaseTokenizer | None = None) -> dict:
    """Read meta.json and check the shards match it (and the tokenizer, if given)."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    if not shards_ok(out_dir, meta):
        raise UserError(f"the shards in {out_dir} do not match meta.json (a file is missing "
                        "or has the wrong size); re-run `scratchllm prepare --force`")
    if tokenizer is not None and tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"the shards in {out_dir} were made with a different tokenizer "
                        f"({_tokenizer_file(out_dir, meta)}); re-run `scratchllm prepare` with "
                        "this tokenizer")
    return meta


def shard_tokenizer_path(shards_dir: str | Path) -> Path:
    """The tokenizer file the shards in a directory were made with (its copy there)."""
    shards_dir = Path(shards_dir)
    path = _tokenizer_file(shards_dir, read_meta(shards_dir))
    if not path.is_file():
        raise UserError(f"the tokenizer {path} that made the shards in {shards_dir} is missing; "
                        "re-run `scratchllm prepare` or set data.tokenizer")
    return path


def _tokenizer_file(shards_dir: Path, meta: dict) -> Path:
    # A relative path (written since the copy) is the directory's own file; an absolute one
    # (older meta.json) stays as it is: Path / absolute gives the absolute path.
    entry = meta.get("tokenizer")
    path = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(path, str) or not path:
        raise UserError(f"{shards_dir / META_FILE} names no tokenizer file; re-run "
                        "`scratchllm prepare --force` or set data.tokenizer")
    return shards_dir / path
