"""`scratchllm prepare`: tokenize sources into flat token shards a trainer streams from.

Output directory:
    train.bin, val.bin   token ids, one after another (uint16 if the vocabulary fits, else
                         uint32), documents separated by <|endoftext|>; read with np.memmap
    meta.json            dtype, token and document counts per split, the tokenizer's
                         fingerprint, every source file with its sha256, the options

The split is by document: document (or long-document segment) number i goes to val when
floor((i + 1) * f + 1/2) > floor(i * f + 1/2), which spreads exactly a fraction f of them
evenly through the corpus, deterministically, without knowing the total in advance.

Memory stays bounded: segments stream from the sources, are encoded in groups of a few
hundred on a thread pool (one tiktoken call per group; its Rust core releases the GIL, so
threads run in parallel without the cost of shipping text and tokens between processes) and
appended to temp files that are renamed into place at the end, so a crash leaves the previous
output intact.
"""

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scratchllm.data import registry
from scratchllm.data.clean import Deduplicator, gutenberg_cut, is_gutenberg, normalize_newlines
from scratchllm.data.download import sha256_file
from scratchllm.data.sources import (
    SEGMENT_CHARS,
    Segment,
    SourceOptions,
    iter_all,
    no_files_message,
    source_files,
)
from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text
from scratchllm.tokenizer import ENDOFTEXT, BaseTokenizer, load_tokenizer

META_FORMAT = "scratchllm-shards"
META_VERSION = 1
# Bump when the same inputs would give different shards (cleaning, segmenting, format).
PIPELINE_VERSION = 2
SPLITS = ("train", "val")


@dataclass
class PrepareOptions:
    """What `prepare` does besides tokenizing; part of the key that detects changes."""

    val_fraction: float = 0.1
    val_docs: int | None = None  # instead of a fraction: the first N documents go to val
    text_field: str = "text"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    dedup: bool = False
    strip_gutenberg: bool = True
    # One more encoding thread than cores: the main thread (reading, cleaning, writing) is
    # mostly waiting, and the extra worker fills the cores while it works (measured +35%).
    threads: int = field(default_factory=lambda: (os.cpu_count() or 1) + 1)

    def key_fields(self) -> dict:
        data = asdict(self)
        data.pop("threads")  # does not change the output
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def describe_sources(sources: Sequence[str], options: PrepareOptions) -> list[dict]:
    """Each source with the files it reads and their sha256 (what detects changed input)."""
    source_options = SourceOptions(options.text_field, options.include, options.exclude)
    described = []
    for source in sources:
        if source in registry.DATASETS:
            files = [{"path": f.path, "sha256": f.sha256} for f in registry.get(source).files]
            if source == "shakespeare":
                from scratchllm.data.shakespeare import play_files

                files = [{"path": p.name, "sha256": sha256_file(p)} for p in play_files()]
            described.append({"source": source, "kind": "dataset", "files": files})
        elif source.startswith("hf:"):
            described.append({"source": source, "kind": "huggingface", "files": []})
        else:
            path = Path(source)
            if path.is_dir():
                paths = list(source_files(path, source_options))
            elif path.is_file():
                paths = [path]
            else:
                raise UserError(f"data source {source!r} does not exist: give a file, a "
                                f"directory, or a dataset name ({', '.join(registry.DATASETS)})")
            if not paths:
                raise UserError(no_files_message(path, source_options))
            described.append({"source": source, "kind": "path", "files": [
                {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in paths]})
    return described


def prepare(sources: Sequence[str], tokenizer_path: str | Path, out_dir: str | Path,
            options: PrepareOptions | None = None, force: bool = False,
            progress: bool = False) -> dict:
    """Tokenize sources into out_dir/{train,val}.bin + meta.json; return the meta dict.

    Re-running with the same sources (by content), tokenizer and options does nothing.
    """
    options = options or PrepareOptions()
    if not 0 <= options.val_fraction < 1:
        raise UserError(f"val fraction must be in [0, 1), got {options.val_fraction}")
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    fingerprint = tok.fingerprint()  # hashes the whole vocabulary: once
    described = describe_sources(sources, options)
    key_content = {"sources": described, "tokenizer": fingerprint,
                   "options": options.key_fields(), "pipeline": PIPELINE_VERSION,
                   "segment_chars": SEGMENT_CHARS}
    key = hashlib.sha256(json.dumps(key_content, sort_keys=True).encode()).hexdigest()
    existing = read_meta(out_dir, missing_ok=True)
    if not force and existing is not None and existing.get("key") == key and _shards_ok(
            out_dir, existing):
        existing["up_to_date"] = True
        return existing

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(tok.vocab_size)
    writers = {split: _ShardWriter(out_dir / f"{split}.bin") for split in SPLITS}
    stats = {"input_chars": 0, "documents": 0, "segments": 0, "empty_dropped": 0,
             "duplicates_dropped": 0, "replaced_bytes": 0}
    source_options = SourceOptions(options.text_field, options.include, options.exclude)
    start = time.perf_counter()
    try:
        total_bytes = sum(f.get("bytes", 0) for d in described for f in d["files"]) or None
        units = _clean_units(iter_all(sources, source_options), options, stats)
        bar = _bar(total_bytes, progress)
        for group, parts in _encode_in_order(tok, units, options.threads):
            for split, part in parts.items():
                writers[split].write(part)
            bar.update(group.chars)  # characters: about bytes, without re-encoding the text
        bar.close()
        for writer in writers.values():
            writer.flush()  # so that the sha256 in the meta covers every token
        stats["replaced_bytes"] = source_options.stats["replaced_bytes"]
        if sum(w.tokens for w in writers.values()) == 0:
            raise UserError(f"the corpus {', '.join(sources)} is empty after cleaning "
                            "(no text to tokenize)")
        meta = {
            "format": META_FORMAT, "version": META_VERSION, "key": key,
            "dtype": dtype.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "tokenizer": {"path": str(Path(tokenizer_path).resolve()),
                          "fingerprint": fingerprint, "type": tok.kind},
            "splits": {s: {"file": f"{s}.bin", "tokens": w.tokens, "documents": w.documents,
                           "segments": w.segments, "sha256": w.digest.hexdigest()}
                       for s, w in writers.items()},
            "sources": described, "options": options.key_fields(), "stats": stats,
            "seconds": round(time.perf_counter() - start, 3),
        }
        # Remove the old meta first: shards without meta read as "not prepared", never as
        # a mismatched pair.
        (out_dir / "meta.json").unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")
        meta["up_to_date"] = False
        return meta
    finally:
        for writer in writers.values():
            writer.discard()


def _clean_units(segments: Iterator[Segment], options: PrepareOptions, stats: dict
                 ) -> Iterator[tuple[str, str, bool]]:
    """(text, split, ends a document) for every kept segment, cleaned and assigned a split."""
    dedup = Deduplicator() if options.dedup else None
    unit = 0
    first = True  # the next segment starts a document
    gutenberg = ended = False  # this document has Gutenberg markers / its END was passed
    for segment in segments:
        text = normalize_newlines(segment.text)
        stats["input_chars"] += len(segment.text)
        whole = first and segment.last  # a document in one segment (almost all of them)
        if first:
            gutenberg, ended = options.strip_gutenberg and is_gutenberg(text), False
        if ended:
            text = ""
        elif gutenberg:
            text, ended = gutenberg_cut(text, find_start=first)
            text = text.lstrip() if first else text
        first = segment.last
        if segment.last:
            stats["documents"] += 1
        if whole and not text.strip():
            stats["empty_dropped"] += 1  # an empty or all-whitespace document
            continue
        if whole and dedup is not None and not dedup.is_new(text):
            stats["duplicates_dropped"] += 1
            continue
        if text or segment.last:
            stats["segments"] += 1
            yield text, _split_of(unit, options), segment.last
            unit += 1


def _split_of(unit: int, options: PrepareOptions) -> str:
    if options.val_docs is not None:
        return "val" if unit < options.val_docs else "train"
    f = options.val_fraction
    return "val" if int((unit + 1) * f + 0.5) > int(unit * f + 0.5) else "train"


@dataclass
class _Group:
    """Consecutive units on their way to the encoder: their texts and where each one goes."""

    texts: list[str] = field(default_factory=list)
    val: list[bool] = field(default_factory=list)  # the unit goes to val
    ends: list[bool] = field(default_factory=list)  # the unit ends a document
    chars: int = 0


@dataclass
class _Part:
    """What one group adds to one split: token ids (<|endoftext|> included) and counts."""

    ids: np.ndarray
    segments: int
    documents: int


def _groups(units: Iterator[tuple[str, str, bool]], group_chars: int) -> Iterator[_Group]:
    """Units gathered into groups of at least `group_chars` characters (except the last)."""
    group = _Group()
    for text, split, doc_end in units:
        group.texts.append(text)
        group.val.append(split == "val")
        group.ends.append(doc_end)
        group.chars += len(text)
        if group.chars >= group_chars:
            yield group
            group = _Group()
    if group.texts:
        yield group


def _encode_in_order(tok: BaseTokenizer, units: Iterator[tuple[str, str, bool]], threads: int,
                     group_chars: int = 262_144) -> Iterator[tuple[_Group, dict[str, _Part]]]:
    """Encode units on a thread pool (tiktoken releases the GIL), yielding groups in order.

    Units travel in groups of about `group_chars` characters; at most a few groups per thread
    are in flight, so memory stays bounded, and reading and cleaning the next units overlaps
    with encoding.
    """
    in_flight: deque = deque()
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        for group in _groups(units, group_chars):
            in_flight.append((group, pool.submit(_encode_group, tok, group)))
            if len(in_flight) >= 4 * threads:
                done, future = in_flight.popleft()
                yield done, future.result()
        while in_flight:
            done, future = in_flight.popleft()
            yield done, future.result()


def _encode_group(tok: BaseTokenizer, group: _Group) -> dict[str, _Part]:
    """The tokens of a group's units, sorted into their splits, <|endoftext|> after documents."""
    ids, seps = _encode_separated(tok, group.texts)
    val, ends = np.array(group.val, dtype=bool), np.array(group.ends, dtype=bool)
    unit = np.repeat(np.arange(len(seps)), np.diff(seps, prepend=-1))  # each token's unit
    keep = np.ones(len(ids), dtype=bool)
    keep[seps[~ends]] = False  # a separator stays only where a document ends
    dtype = dtype_for(tok.vocab_size)
    parts = {}
    for split, chosen in (("train", ~val), ("val", val)):
        parts[split] = _Part(ids[keep & chosen[unit]].astype(dtype), int(chosen.sum()),
                             int((ends & chosen).sum()))
    return parts


def _encode_separated(tok: BaseTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ids of each text followed by <|endoftext|>, and the positions of those separators.

    Fast path: one tiktoken call on the texts joined by <|endoftext|> as an allowed special
    token. tiktoken encodes the text between special tokens on its own, so this gives exactly
    the ids of encoding each text alone, and the worker thread needs the GIL once per group
    rather than once per unit (per-unit calls left cores idle, waiting for the GIL). It holds
    only if no text contains the <|endoftext|> string itself; otherwise, text by text.
    """
    fast = getattr(tok, "fast", None)  # the BPE tokenizer's tiktoken.Encoding
    if fast is not None:
        joined = ENDOFTEXT.join(texts) + ENDOFTEXT
        if joined.count(ENDOFTEXT) == len(texts):
            ids = fast.encode_to_numpy(joined, allowed_special={ENDOFTEXT},
                                       disallowed_special=())
            seps = np.flatnonzero(ids == tok.eot_id)
            if len(seps) == len(texts):  # each separator became <|endoftext|>, nothing else did
                return ids, seps
    eot = np.array([tok.eot_id], dtype=np.uint32)
    encoded = [tok.encode_array(text) for text in texts]
    ids = np.concatenate([part for array in encoded for part in (array, eot)])
    return ids, np.cumsum([len(array) + 1 for array in encoded]) - 1


class _ShardWriter:
    """Appends token ids to a temp file, hashing as it goes; commit renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")
        self.digest = hashlib.sha256()
        self.tokens = self.documents = self.segments = 0
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def write(self, part: _Part) -> None:
        self.pending.append(part.ids)
        self.segments += part.segments
        self.documents += part.documents
        self.tokens += len(part.ids)
        self.pending_tokens += len(part.ids)
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
        self.flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def read_meta(out_dir: str | Path, missing_ok: bool = False) -> dict | None:
    """Read DIR/meta.json; a UserError if it is missing (unless missing_ok) or not ours."""
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        if missing_ok:
            return None
        raise UserError(f"{path} does not exist: run `scratchllm prepare --out {out_dir}` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt; re-run `scratchllm prepare --force`") from None
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise UserError(f"{path} is not scratchllm shard metadata version {META_VERSION}; "
                        "re-run `scratchllm prepare --force`")
    return meta


def _shards_ok(out_dir: Path, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        path = out_dir / split["file"]
        if not path.is_file() or path.stat().st_size != split["tokens"] * itemsize:
            return False
    return True


def check_shards(out_dir: str | Path, tokenizer: BaseTokenizer | None = None) -> dict:
    """Read meta.json and check the shards match it (and the tokenizer, if given)."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    if not _shards_ok(out_dir, meta):
        raise UserError(f"the shards in {out_dir} do not match meta.json (a file is missing "
                        "or has the wrong size); re-run `scratchllm prepare --force`")
    if tokenizer is not None and tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"the shards in {out_dir} were made with a different tokenizer "
                        f"({meta['tokenizer']['path']}); re-run `scratchllm prepare` with this "
                        "tokenizer")
    return meta


def _bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                file=sys.stderr)
