"""Atomic writes (a crash never leaves a half-written file under the real name) and JSON reads
with one-line errors."""

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_utf8(file: Path, hint: str) -> str:
    """The text of a file the user named, or a UserError that ends with `hint` (what to do):
    missing, a directory, unreadable or not UTF-8."""
    from scratchllm.errors import UserError

    if not file.is_file():
        raise UserError(f"{file} not found: {hint}")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {file} ({e}): {hint}") from None


def read_json(file: Path, hint: str) -> Any:
    """The JSON value in `file`, or a UserError that ends with `hint` (what to do)."""
    from scratchllm.errors import UserError

    text = read_utf8(file, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}): {hint}") from None


def read_json_object(file: Path, hint: str) -> dict[str, Any]:
    """A JSON object from `file`, or a UserError that ends with `hint` (what to do)."""
    from scratchllm.errors import UserError

    data = read_json(file, hint)
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object: {hint}")
    return data


def json_line(line: str, where: str) -> Any:
    """One JSON text already read (a JSON Lines record, or a whole file's text), or a UserError
    naming `where` it is (path:line, or the path)."""
    from scratchllm.errors import UserError

    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
