"""Where text comes from: named datasets, files, directories, JSONL/JSON/Parquet, HF datasets.

Every source is read as a stream of `Segment`s: whole documents, except that a long text
document is cut into segments of about SEGMENT_CHARS characters at places where the built-in
pre-tokenizers always end a chunk, so memory stays bounded and the tokens are those of the
whole document.

Non-UTF-8 input: invalid bytes are replaced with U+FFFD and counted (a warning names the file
and the count); training on a few bad bytes beats refusing a large corpus. A file with NUL
bytes near its start is taken to be binary and refused.
"""

import bz2
import codecs
import fnmatch
import gzip
import io
import json
import lzma
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scratchllm.errors import UserError
from scratchllm.tokenizer.pretokenize import safe_cut

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
# Long documents are cut into segments of about this size: for bounded memory, and so that
# the train/val split (by segment) can give a one-file corpus a validation part.
SEGMENT_CHARS = 2_000


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
    # Resolved paths a directory listing never yields (prepare's own output files).
    skip_files: frozenset[Path] = frozenset()


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
    skip_names = {p.name for p in options.skip_files}  # resolve() only the few that may match
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name in skip_names and path.resolve() in options.skip_files:
            continue
        rel = path.relative_to(directory).as_posix()
        if base_suffix(path) not in TEXT_SUFFIXES + RECORD_SUFFIXES:
            continue
        if options.include and not any(_match(rel, g) for g in options.include):
            continue
        if any(_match(rel, g) for g in options.exclude):
            continue
        yield path


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
    try:
        with open_binary(path) as f:
            first = True
            while True:
                try:
                    data = f.read(block)
                except (OSError, EOFError, ValueError) as e:
                    raise UserError(f"cannot read {path}: {e}") from None
                if first and b"\x00" in data[:8192]:
                    raise UserError(f"{path} looks like a binary file (it holds NUL bytes); "
                                    "give a text file")
                first = False
                _ReplacementCounter.current = counter  # another file may have been read since
                text = decoder.decode(data, final=not data)
                if text:
                    yield text
                if not data:
                    break
    finally:
        if counter.bytes:
            options.stats["replaced_bytes"] += counter.bytes
            print(f"warning: {path}: {counter.bytes} bytes were not valid UTF-8 and became "
                  "U+FFFD", file=sys.stderr)


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
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
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


def _hf_segments(name: str, options: SourceOptions) -> Iterator[Segment]:
    """Stream a Hugging Face dataset (hf:NAME[:CONFIG][@SPLIT]) without downloading it all."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the datasets library: pip install "
                        "'scratchllm[hf]'") from None
    name, _, split = name.partition("@")
    name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train",
                                       streaming=True)
    except Exception as e:  # network, auth and name errors all come from here
        raise UserError(f"cannot open HF dataset {name!r}: {e}") from None
    for i, record in enumerate(stream):
        yield Segment(_field(record, options, f"hf:{name} record {i}"), f"hf:{name}#{i}")


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
