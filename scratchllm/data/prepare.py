"""`scratchllm prepare`: tokenize sources into flat token shards a trainer streams from.

The output directory is in the shard format of shards.py: train.bin and val.bin (token ids),
tokenizer.json (a copy of the tokenizer, so the directory can be moved) and meta.json (counts,
the tokenizer's fingerprint, every source file with its sha256, the options).

The split is by document: document (or long-document segment) number i goes to val when
floor((i + 1) * f + 1/2) > floor(i * f + 1/2), which spreads exactly a fraction f of them
evenly through the corpus, deterministically, without knowing the total in advance. With
`val_docs` N instead, the first N documents go to val, each whole however long.

Memory stays bounded: segments stream from the sources, are encoded in groups of a few
hundred on a thread pool (one tiktoken call per group; its Rust core releases the GIL, so
threads run in parallel without the cost of shipping text and tokens between processes) and
appended to temp files that are renamed into place at the end, so a crash leaves the previous
output intact. With `dedup`, a document of several segments waits until its end, when the
hash of its whole text decides whether it is kept: in memory up to HOLD_MEMORY_BYTES, then in
a temp file.

Nothing under the output directory is ever read as a source, so it may lie inside a source
directory and a rerun finds its inputs unchanged.
"""

import hashlib
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scratchllm.data import registry
from scratchllm.data.clean import (
    Deduplicator,
    gutenberg_cut,
    is_gutenberg,
    normalize_newlines,
    utf8,
)
from scratchllm.data.download import sha256_file
from scratchllm.data.shards import (
    META_FILE,
    META_FORMAT,
    META_VERSION,
    SPLITS,
    TOKENIZER_FILE,
    ShardWriter,
    dtype_for,
    read_meta,
    shards_ok,
    write_meta,
)
from scratchllm.data.sources import (
    SEGMENT_CHARS,
    Segment,
    SourceOptions,
    hf_revision,
    is_inside,
    iter_all,
    no_files_message,
    source_files,
)
from scratchllm.errors import UserError
from scratchllm.tokenizer import ENDOFTEXT, BaseTokenizer, load_tokenizer
from scratchllm.tokenizer.bpe import tiktoken_errors

# Bump when the same inputs would give different shards (cleaning, segmenting, format).
# 3: --dedup compares whole documents, --val-docs counts documents (both were per segment).
PIPELINE_VERSION = 3
# With --dedup, a long document is held until its end (its hash decides whether it is kept):
# in memory up to this many bytes, then in a temp file.
HOLD_MEMORY_BYTES = 64 << 20


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
    allow_binary: bool = False  # read files that look binary anyway (see SourceOptions)
    # One more encoding thread than cores: the main thread (reading, cleaning, writing) is
    # mostly waiting, and the extra worker fills the cores while it works (measured +35%).
    threads: int = field(default_factory=lambda: (os.cpu_count() or 1) + 1)

    def key_fields(self) -> dict:
        data = asdict(self)
        data.pop("threads")  # does not change the output
        data.pop("allow_binary")  # only lets a run go ahead that would otherwise stop
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data


def _source_options(options: PrepareOptions, out_dir: str | Path | None = None
                    ) -> SourceOptions:
    """How prepare reads its sources; never the files it writes itself into out_dir."""
    # An output directory inside a source directory must not be read back as documents on
    # the next run: not meta.json or the tokenizer copy, nor anything else put there.
    skip = (Path(out_dir).resolve(),) if out_dir is not None else ()
    return SourceOptions(options.text_field, options.include, options.exclude, skip_dirs=skip,
                         allow_binary=options.allow_binary)


def describe_sources(sources: Sequence[str], options: PrepareOptions,
                     source_options: SourceOptions | None = None) -> list[dict]:
    """Each source with the files it reads and their sha256 (what detects changed input)."""
    source_options = source_options or _source_options(options)
    described = []
    for source in sources:
        if source in registry.DATASETS:
            files = [{"path": f.path, "sha256": f.sha256} for f in registry.get(source).files]
            if source == "shakespeare":
                from scratchllm.data.shakespeare import play_files

                files = [{"path": p.name, "sha256": sha256_file(p)} for p in play_files()]
            described.append({"source": source, "kind": "dataset", "files": files})
        elif source.startswith("hf:"):
            # The revision puts a changed remote dataset in the key. None when `datasets`
            # exposes none: then the dataset is taken as unchanged (--force re-reads it).
            described.append({"source": source, "kind": "huggingface", "files": [],
                              "revision": hf_revision(source)})
        else:
            path = Path(source)
            if source_options.skip_dirs and is_inside(path, source_options.skip_dirs):
                raise UserError(f"data source {source} is inside the output directory, where "
                                "prepare writes: choose an --out outside it")
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
    """Tokenize sources into out_dir/{train,val}.bin + tokenizer.json + meta.json; return meta.

    Re-running with the same sources (by content), tokenizer and options does nothing.
    """
    options = options or PrepareOptions()
    if not 0 <= options.val_fraction < 1:
        raise UserError(f"val fraction must be in [0, 1), got {options.val_fraction}")
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    fingerprint = tok.fingerprint()  # hashes the whole vocabulary: once
    source_options = _source_options(options, out_dir)
    described = describe_sources(sources, options, source_options)
    source_options.revisions = {d["source"]: d["revision"] for d in described
                                if d.get("revision")}  # read what the key describes
    key_content = {"sources": described, "tokenizer": fingerprint,
                   "options": options.key_fields(), "pipeline": PIPELINE_VERSION,
                   "segment_chars": SEGMENT_CHARS}
    key = hashlib.sha256(json.dumps(key_content, sort_keys=True).encode()).hexdigest()
    existing = read_meta(out_dir, missing_ok=True)
    if not force and existing is not None and existing.get("key") == key and shards_ok(
            out_dir, existing):
        if not _tokenizer_copy_ok(out_dir, existing, fingerprint):
            # Shards from before the copy (meta.json has an absolute path) or a lost copy:
            # the tokens are right, so only the tokenizer file and meta.json are written.
            tok.save(out_dir / TOKENIZER_FILE)
            existing["tokenizer"] = _tokenizer_entry(tok, fingerprint)
            write_meta(out_dir, existing)
        existing["up_to_date"] = True
        return existing

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(tok.vocab_size)
    writers = {split: ShardWriter(out_dir / f"{split}.bin") for split in SPLITS}
    stats = {"input_chars": 0, "documents": 0, "segments": 0, "empty_dropped": 0,
             "duplicates_dropped": 0, "replaced_bytes": 0}
    start = time.perf_counter()
    try:
        total_bytes = sum(f.get("bytes", 0) for d in described for f in d["files"]) or None
        units = _clean_units(iter_all(sources, source_options), options, stats)
        bar = _bar(total_bytes, progress)
        for group, parts in _encode_in_order(tok, units, options.threads):
            for split, part in parts.items():
                writers[split].write(part.ids, part.segments, part.documents)
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
            "tokenizer": _tokenizer_entry(tok, fingerprint),
            "splits": {s: {"file": f"{s}.bin", "tokens": w.tokens, "documents": w.documents,
                           "segments": w.segments, "sha256": w.digest.hexdigest()}
                       for s, w in writers.items()},
            "sources": described, "options": options.key_fields(), "stats": stats,
            "seconds": round(time.perf_counter() - start, 3),
        }
        # Remove the old meta first: shards without meta read as "not prepared", never as
        # a mismatched set. The tokenizer copy, like the shards, is in place before the meta.
        (out_dir / META_FILE).unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        tok.save(out_dir / TOKENIZER_FILE)  # atomic
        write_meta(out_dir, meta)
        meta["up_to_date"] = False
        return meta
    finally:
        for writer in writers.values():
            writer.discard()


def _tokenizer_entry(tok: BaseTokenizer, fingerprint: str) -> dict:
    """meta.json's tokenizer: its copy in the shard directory, by a relative path."""
    return {"path": TOKENIZER_FILE, "fingerprint": fingerprint, "type": tok.kind}


def _tokenizer_copy_ok(out_dir: Path, meta: dict, fingerprint: str) -> bool:
    """Whether meta.json names the directory's own tokenizer copy and that copy is intact."""
    entry = meta.get("tokenizer")
    if not isinstance(entry, dict) or entry.get("path") != TOKENIZER_FILE:
        return False
    try:
        return load_tokenizer(out_dir / TOKENIZER_FILE).fingerprint() == fingerprint
    except UserError:
        return False


def _clean_units(segments: Iterator[Segment], options: PrepareOptions, stats: dict
                 ) -> Iterator[tuple[str, str, bool]]:
    """(text, split, ends a document) for every kept segment, cleaned and assigned a split."""
    units = _cleaned(segments, options, stats)
    if options.dedup:
        units = _deduplicated(units, stats)
    unit = document = 0  # kept segments and kept documents so far
    for text, last in units:
        stats["segments"] += 1
        yield text, _split_of(unit, document, options), last
        unit += 1
        document += last


def _cleaned(segments: Iterator[Segment], options: PrepareOptions, stats: dict
             ) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) for the segments left after cleaning; empty documents dropped."""
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
        if text or segment.last:
            yield text, segment.last


def _deduplicated(units: Iterator[tuple[str, bool]], stats: dict
                  ) -> Iterator[tuple[str, bool]]:
    """The units of documents whose whole text was not seen before (compared by hash).

    A document in one segment is decided at once. A longer one is held (in memory, then in a
    temp file) until its last segment gives the hash of its whole text.
    """
    dedup = Deduplicator()
    digest = dedup.hasher()
    held: _HeldDocument | None = None
    try:
        for text, last in units:
            digest.update(utf8(text))
            if held is None and not last:
                held = _HeldDocument()
            if held is not None:
                held.add(text)
            if not last:
                continue
            if dedup.is_new_digest(digest.digest()):
                yield from held.replay() if held is not None else [(text, True)]
            else:
                stats["duplicates_dropped"] += 1
            if held is not None:
                held.close()
                held = None
            digest = dedup.hasher()
    finally:
        if held is not None:  # stopped by an error: delete the temp file now
            held.close()


class _HeldDocument:
    """A long document's cleaned segments until its end: in memory, then in a temp file."""

    def __init__(self) -> None:
        # newline="" keeps every character as it is; surrogatepass, any str at all.
        self.file = tempfile.SpooledTemporaryFile(max_size=HOLD_MEMORY_BYTES, mode="w+",
                                                  encoding="utf-8", errors="surrogatepass",
                                                  newline="")
        self.lengths: list[int] = []

    def add(self, text: str) -> None:
        """Append a segment."""
        self.file.write(text)
        self.lengths.append(len(text))

    def replay(self) -> Iterator[tuple[str, bool]]:
        """The segments again, as (text, ends the document)."""
        self.file.seek(0)
        for i, length in enumerate(self.lengths):
            yield self.file.read(length), i == len(self.lengths) - 1

    def close(self) -> None:
        """Free the memory or delete the temp file."""
        self.file.close()


def _split_of(unit: int, document: int, options: PrepareOptions) -> str:
    """Unit number `unit`, part of kept document number `document`, goes to which split."""
    if options.val_docs is not None:
        return "val" if document < options.val_docs else "train"
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
            with tiktoken_errors():
                ids = fast.encode_to_numpy(joined, allowed_special={ENDOFTEXT},
                                           disallowed_special=())
            seps = np.flatnonzero(ids == tok.eot_id)
            if len(seps) == len(texts):  # each separator became <|endoftext|>, nothing else did
                return ids, seps
    eot = np.array([tok.eot_id], dtype=np.uint32)
    encoded = [tok.encode_array(text) for text in texts]
    ids = np.concatenate([part for array in encoded for part in (array, eot)])
    return ids, np.cumsum([len(array) + 1 for array in encoded]) - 1


def _bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                file=sys.stderr)
