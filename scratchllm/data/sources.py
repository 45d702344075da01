"""Where text comes from: the named default corpus, a file, or a directory of files.

Non-UTF-8 input: invalid bytes are replaced with U+FFFD and counted, and a warning names the
file and the count (training on a few bad bytes is better than refusing a large corpus).
A file with NUL bytes near its start is taken to be binary and refused.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

from scratchllm.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
NAMED = ("shakespeare",)


def read_text_file(path: str | Path, warn: bool = True) -> tuple[str, int]:
    """Read a text file as UTF-8; return (text, number of invalid bytes replaced)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if b"\x00" in data[:8192]:
        raise UserError(f"{path} looks like a binary file (it holds NUL bytes); give a text file")
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    bad = 0
    text_parts: list[str] = []
    view = data
    while True:  # decode, replacing each invalid run with U+FFFD and counting its bytes
        try:
            text_parts.append(view.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            text_parts.append(view[: e.start].decode("utf-8"))
            text_parts.append("\ufffd")
            bad += e.end - e.start
            view = view[e.end :]
    if warn:
        print(f"warning: {path}: {bad} bytes were not valid UTF-8 and became U+FFFD",
              file=sys.stderr)
    return "".join(text_parts), bad


def texts_from_source(source: str) -> Iterator[str]:
    """Yield the documents of a source: 'shakespeare' (one per play), a file, or a directory."""
    if source == "shakespeare":
        from scratchllm.data.shakespeare import shakespeare_plays

        yield from shakespeare_plays().values()
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        for file in files:
            yield read_text_file(file)[0]
    elif path.exists():
        yield read_text_file(path)[0]
    else:
        raise UserError(f"data source {source!r} does not exist: give a file, a directory, or "
                        f"a named corpus ({', '.join(NAMED)})")
