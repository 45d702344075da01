"""Where text comes from: named datasets, files, directories, JSONL/JSON/Parquet, HF datasets.

Every source is read as a stream of `Segment`s: whole documents, except that a long text
document is cut into segments of about SEGMENT_CHARS characters at places where the built-in
pre-tokenizers always end a chunk, so memory stays bounded and the tokens are those of the
whole document.

Non-UTF-8 input: invalid bytes are replaced with U+FFFD and counted (a warning names the file
and the count); training on a few bad bytes beats refusing a large corpus. A file with NUL
bytes near its start, or with more than 1% of its bytes invalid, is taken to be binary and
refused, unless `SourceOptions.allow_binary` says to read it anyway.
"""

import bz2
import codecs
import fnmatch
import gzip
import heapq
import io
import json
import lzma
import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scratchllm.errors import UserError
from scratchllm.fileio import json_line
from scratchllm.tokenizer.pretokenize import safe_cut

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
# Long documents are cut into segments of about this size: for bounded memory, and so that
# the train/val split (by segment) can give a one-file corpus a validation part.
SEGMENT_CHARS = 2_000
# A file with more than this fraction of its bytes not valid UTF-8 is binary, not text with
# a few bad bytes (text in Latin-1 with many accented letters is refused too; the error says
# how to read it anyway).
MAX_REPLACED_FRACTION = 0.01
# What tokenizer training reads by default: plenty for a BPE of any usual size, and bounded
# memory whatever the source (100 MB of text).
DEFAULT_MAX_CHARS = 100_000_000


@dataclass
class Segment:
    """A piece of a document; `last` is False for all but the final piece of a long one."""

    text: str
    origin: str
    last: bool = True


@dataclass
class SourceOptions:
    """How to read a source: the record field holding text, and which files to take."""

    text_field: str = "text"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    stats: dict[str, int] = field(default_factory=lambda: {"replaced_bytes": 0})
    # Resolved directories a directory listing never enters (prepare's output directory).
    skip_dirs: tuple[Path, ...] = ()
    # Read files that look binary anyway, as UTF-8 with U+FFFD for the bad bytes.
    allow_binary: bool = False
    # hf: source -> the dataset revision (commit) to stream, so that what is read is what a
    # key computed from that revision describes.
    revisions: dict[str, str] = field(default_factory=dict)


def iter_segments(source: str, options: SourceOptions | None = None) -> Iterator[Segment]:
    """Stream the segments of a source: a registry name, 'hf:NAME', a file or a directory."""
    from scratchllm.data import registry

    options = options or SourceOptions()
    if source in registry.DATASETS:
        for i, text in enumerate(registry.documents(source)):
            yield from _segments_of([text], f"{source}#{i}")
        return
    if source.startswith("hf:"):
        yield from _hf_segments(source[3:], options)
        return
    path = Path(source)
    if path.is_dir():
        files = list(source_files(path, options))
        if not files:
            raise UserError(no_files_message(path, options))
        for file in files:
            yield from _file_segments(file, options)
    elif path.is_file():
        yield from _file_segments(path, options)
    else:
        raise UserError(f"data source {source!r} does not exist: give a file, a directory, or "
                        f"a dataset name ({', '.join(registry.DATASETS)}); "
                        "`scratchllm data list` shows them")


def texts_from_source(source: str, options: SourceOptions | None = None) -> Iterator[str]:
    """Yield whole documents of a source (segments joined back together)."""
    parts: list[str] = []
    for segment in iter_segments(source, options):
        parts.append(segment.text)
        if segment.last:
            yield "".join(parts)
            parts = []


def source_files(directory: Path, options: SourceOptions) -> Iterator[Path]:
    """Readable files under a directory, recursively, sorted, filtered by the globs."""
    skipped: dict[Path, bool] = {}  # parent directory -> inside a skipped one (resolved once)
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if options.skip_dirs:
            inside = skipped.get(path.parent)
            if inside is None:
                inside = skipped[path.parent] = is_inside(path.parent, options.skip_dirs)
            if inside:
                continue
        rel = path.relative_to(directory).as_posix()
        if base_suffix(path) not in TEXT_SUFFIXES + RECORD_SUFFIXES:
            continue
        if options.include and not any(_match(rel, g) for g in options.include):
            continue
        if any(_match(rel, g) for g in options.exclude):
            continue
        yield path


def is_inside(path: Path, directories: Sequence[Path]) -> bool:
    """Whether path (resolved) is one of the resolved directories or lies below one."""
    resolved = path.resolve()
    return any(resolved == d or d in resolved.parents for d in directories)


def no_files_message(directory: Path, options: SourceOptions) -> str:
    """The error for a directory with nothing to read."""
    globs = " that match the include/exclude globs" if options.include or options.exclude else ""
    return (f"no readable files{globs} in {directory} "
            f"(readable: {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}, optionally compressed)")


def _match(rel: str, glob: str) -> bool:
    return fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], glob)


def base_suffix(path: Path) -> str:
    """The format suffix, looking through a compression suffix: a.jsonl.gz -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for reading bytes, decompressing .gz/.zst/.bz2/.xz transparently."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            return gzip.open(path, "rb")
        if suffix == ".bz2":
            return bz2.open(path, "rb")
        if suffix == ".xz":
            return lzma.open(path, "rb")
        if suffix == ".zst":
            try:
                import zstandard
            except ImportError:
                raise UserError(f"{path} is zstd-compressed: pip install zstandard") from None
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"file {path} does not exist") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None


def _file_segments(path: Path, options: SourceOptions) -> Iterator[Segment]:
    kind = base_suffix(path)
    if kind == ".jsonl":
        yield from _jsonl_segments(path, options)
    elif kind == ".json":
        yield from _json_segments(path, options)
    elif kind == ".parquet":
        yield from _parquet_segments(path, options)
    else:
        yield from _text_segments(path, options)


def _decoded_blocks(path: Path, options: SourceOptions, block: int = 1 << 20):
    """Yield decoded text blocks of a (possibly compressed) file; refuse binary files."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="scratchllm-count")
    counter = _ReplacementCounter.current = _ReplacementCounter()
    # A plain file's size is known: once more than 1% of it is bad the whole file is, so a
    # large binary file is refused at its first block. A compressed one is judged at its end.
    size = None if path.suffix.lower() in COMPRESSED_SUFFIXES else _size(path)
    read = 0
    refused = False
    try:
        with open_binary(path) as f:
            while True:
                try:
                    data = f.read(block)
                except (OSError, EOFError, ValueError) as e:
                    raise UserError(f"cannot read {path}: {e}") from None
                if not read and b"\x00" in data[:8192] and not options.allow_binary:
                    refused = True
                    raise UserError(f"{path} looks like a binary file (it holds NUL bytes); "
                                    "give a text file, or allow it with --allow-binary")
                read += len(data)
                _ReplacementCounter.current = counter  # another file may have been read since
                text = decoder.decode(data, final=not data)
                total = max(size, read) if size is not None else None if data else read
                if (not options.allow_binary and total is not None
                        and counter.bytes > MAX_REPLACED_FRACTION * total):
                    refused = True
                    raise UserError(_binary_message(path, total))
                if text:
                    yield text
                if not data:
                    break
    finally:
        if counter.bytes and not refused:
            options.stats["replaced_bytes"] += counter.bytes
            print(f"warning: {path}: {counter.bytes} bytes were not valid UTF-8 and became "
                  "U+FFFD", file=sys.stderr)


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None  # open_binary says what is wrong


def _binary_message(path: Path, total: int) -> str:
    return (f"{path} looks like a binary file (or text not in UTF-8): more than "
            f"{MAX_REPLACED_FRACTION:.0%} of its {total:,} bytes are not valid UTF-8; convert "
            "it to UTF-8 text, or read it anyway with --allow-binary (bad bytes become U+FFFD)")


class _ReplacementCounter:
    """Counts bytes replaced by the 'scratchllm-count' decoding error handler."""

    current: "_ReplacementCounter"

    def __init__(self) -> None:
        self.bytes = 0


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _ReplacementCounter.current.bytes += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("scratchllm-count", _count_and_replace)


def _text_segments(path: Path, options: SourceOptions) -> Iterator[Segment]:
    yield from _segments_of(_decoded_blocks(path, options), str(path))


def _segments_of(blocks: Iterable[str], origin: str) -> Iterator[Segment]:
    """Cut a document arriving in blocks into segments of about SEGMENT_CHARS at safe cuts."""
    pending, pos = "", 0
    for block in blocks:
        pending = pending[pos:] + block
        pos = 0
        while len(pending) - pos > 2 * SEGMENT_CHARS:
            cut = _cut_position(pending, pos)
            yield Segment(pending[pos:cut], origin, last=False)
            pos = cut
    yield Segment(pending[pos:], origin, last=True)


def _cut_position(text: str, pos: int) -> int:
    """A safe cut in text[pos + SEGMENT_CHARS : pos + 2 * SEGMENT_CHARS] (hard if none)."""
    end = pos + 2 * SEGMENT_CHARS
    cut = safe_cut(text, pos + SEGMENT_CHARS, end)
    return end if cut is None else cut  # no letters at all: tokens may differ at a hard cut


def _lines(path: Path, options: SourceOptions) -> Iterator[str]:
    tail = ""
    for block in _decoded_blocks(path, options):
        lines = (tail + block).split("\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def _field(record: object, options: SourceOptions, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a {options.text_field!r} field, "
                        f"got {type(record).__name__}")
    if options.text_field not in record:
        keys = ", ".join(map(repr, list(record)[:8]))
        raise UserError(f"{where}: no field {options.text_field!r} (it has {keys}); "
                        "choose one with --text-field")
    value = record[options.text_field]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {options.text_field!r} is not a string")
    return value


def _jsonl_segments(path: Path, options: SourceOptions) -> Iterator[Segment]:
    for number, line in enumerate(_lines(path, options), start=1):
        if not line.strip():
            continue
        record = json_line(line, f"{path}:{number}")
        yield Segment(_field(record, options, f"{path}:{number}"), f"{path}:{number}")


def _json_segments(path: Path, options: SourceOptions) -> Iterator[Segment]:
    text = "".join(_decoded_blocks(path, options))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        yield Segment(_field(record, options, f"{path}[{i}]"), f"{path}[{i}]")


def _parquet_segments(path: Path, options: SourceOptions) -> Iterator[Segment]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is Parquet: pip install 'scratchllm[parquet]'") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if options.text_field not in file.schema_arrow.names:
        raise UserError(f"{path}: no column {options.text_field!r} (it has "
                        f"{', '.join(file.schema_arrow.names)}); choose one with --text-field")
    row = 0
    for batch in file.iter_batches(batch_size=1024, columns=[options.text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None:
                yield Segment(str(value), f"{path}#{row}")


def _hf_segments(spec: str, options: SourceOptions) -> Iterator[Segment]:
    """Stream a Hugging Face dataset (hf:NAME[:CONFIG][@SPLIT]) without downloading it all."""
    name = _hf_parts(spec)[0]
    # Pinned to the revision prepare's key holds, when there is one.
    for i, record in enumerate(hf_records(spec, options.revisions.get(f"hf:{spec}"))):
        yield Segment(_field(record, options, f"hf:{name} record {i}"), f"hf:{name}#{i}")


def hf_records(spec: str, revision: str | None = None) -> Iterator[dict]:
    """The records of a Hugging Face dataset, streamed: spec is NAME[:CONFIG][@SPLIT] (the part
    after 'hf:'), NAME a Hub name or a local directory of data files."""
    datasets = _datasets()
    name, config, split = _hf_parts(spec)
    pinned = {"revision": revision} if revision else {}
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True, **pinned)
    except Exception as e:  # network, auth and name errors all come from here
        raise UserError(f"cannot open HF dataset {name!r}: {e}") from None
    try:
        yield from stream
    except Exception as e:  # a connection lost mid-stream, a bad data file
        raise UserError(f"cannot read HF dataset {name!r}: {e}") from None


def hf_revision(source: str) -> str | None:
    """The current revision (commit) of an hf: source's dataset, if `datasets` exposes one."""
    datasets = _datasets()
    name, config, _ = _hf_parts(source.removeprefix("hf:"))
    load_builder = getattr(datasets, "load_dataset_builder", None)
    if load_builder is None:
        return None
    try:
        # For a dataset on the Hub, the builder's hash is the commit it resolved.
        revision = getattr(load_builder(name, config), "hash", None)
    except Exception as e:  # network, auth and name errors all come from here
        raise UserError(f"cannot open HF dataset {name!r}: {e}") from None
    return revision if isinstance(revision, str) and revision else None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the datasets library: pip install "
                        "'scratchllm[hf]'") from None
    return datasets


def _hf_parts(spec: str) -> tuple[str, str | None, str]:
    """NAME[:CONFIG][@SPLIT] -> (name, config or None, split, 'train' by default)."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return name, config or None, split or "train"


def read_text_file(path: str | Path) -> tuple[str, int]:
    """Read a whole text file as UTF-8; return (text, number of invalid bytes replaced)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a file")
    options = SourceOptions()
    text = "".join(_decoded_blocks(path, options))
    return text, options.stats["replaced_bytes"]


def iter_all(sources: Iterable[str], options: SourceOptions) -> Iterator[Segment]:
    """Segments of several sources, one after the other."""
    for source in sources:
        yield from iter_segments(source, options)


def sample_texts(sources: Sequence[str], max_chars: int = DEFAULT_MAX_CHARS,
                 options: SourceOptions | None = None, seed: int = 0) -> tuple[list[str], int]:
    """At most max_chars characters of the sources' text, sampled evenly; and the total read.

    The sources are read once, as a stream of segments (records longer than a segment are
    cut like long documents). Each segment gets a random key; the sample is the segments with
    the smallest keys that fit in the budget (kept in a heap while streaming, so memory stays
    at about max_chars), a uniform sample of the whole stream rather than its beginning.
    Kept segments come back in stream order, neighbours from one document joined again, so a
    corpus within the budget comes back as its documents, unchanged.
    """
    if max_chars < 1:
        raise UserError(f"the character budget must be at least 1, got {max_chars}")
    rng = random.Random(seed)
    heap: list[tuple[float, int, int, str]] = []  # (-key, position, document, text)
    threshold = 1.0  # the kept segments are exactly those seen with a key below it
    kept = total = 0
    segments = iter_all(sources, options or SourceOptions())
    for position, (document, text) in enumerate(_pieces(segments)):
        total += len(text)
        key = rng.random()
        if key >= threshold or not text:
            continue
        heapq.heappush(heap, (-key, position, document, text))
        kept += len(text)
        while kept > max_chars:  # drop the largest keys, and any later one above them
            neg_key, _, _, dropped = heapq.heappop(heap)
            kept -= len(dropped)
            threshold = -neg_key
    groups: list[list[str]] = []
    last = (-2, -2)
    for _, position, document, text in sorted(heap, key=lambda item: item[1]):
        if (position - 1, document) == last:
            groups[-1].append(text)  # the next piece of the same document
        else:
            groups.append([text])
        last = (position, document)
    return ["".join(group) for group in groups], total


def _pieces(segments: Iterable[Segment]) -> Iterator[tuple[int, str]]:
    """(document number, text) for each segment; records longer than a segment are cut."""
    document = 0
    for segment in segments:
        if len(segment.text) > 2 * SEGMENT_CHARS:  # a long record: cut it like a document
            for piece in _segments_of([segment.text], segment.origin):
                yield document, piece.text
        else:
            yield document, segment.text
        document += segment.last
