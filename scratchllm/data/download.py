"""Download a file once into a cache, verified by size and sha256, written atomically."""

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from scratchllm.errors import UserError

CHUNK = 1 << 16


def cache_dir() -> Path:
    """SCRATCHLLM_CACHE, else $XDG_CACHE_HOME/scratchllm, else ~/.cache/scratchllm."""
    if os.environ.get("SCRATCHLLM_CACHE"):
        return Path(os.environ["SCRATCHLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scratchllm"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, size: int | None = None, retries: int = 3,
             timeout: float = 30.0, backoff: float = 1.0, progress: bool = False) -> Path:
    """Fetch url to dest unless a verified copy is there; retry transient failures.

    The bytes go to a temp file beside dest and are renamed into place only after their
    size and sha256 match, so dest is either absent or complete and verified.
    """
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    last_error = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(url, dest, sha256, size, timeout, progress)
            return dest
        except _ChecksumError as e:
            raise UserError(str(e)) from None  # a wrong file will not get better by retrying
        except (urllib.error.URLError, OSError, http.client.HTTPException, _IncompleteError) as e:
            last_error = str(getattr(e, "reason", None) or e)
            if isinstance(e, urllib.error.HTTPError) and e.code < 500 and e.code != 429:
                break  # 404 and friends are not transient
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    raise UserError(f"could not download {url} ({last_error}); if you are offline, set "
                    f"SCRATCHLLM_DATA_DIR to a mirror directory holding this file")


class _ChecksumError(Exception):
    pass


class _IncompleteError(Exception):
    pass


def _fetch_once(url: str, dest: Path, sha256: str, size: int | None, timeout: float,
                progress: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": "scratchllm"})
        with urllib.request.urlopen(request, timeout=timeout) as response, \
                os.fdopen(fd, "wb") as out:
            expected = int(response.headers.get("Content-Length") or size or 0) or None
            bar = _bar(expected, dest.name, progress)
            while block := response.read(CHUNK):
                digest.update(block)
                out.write(block)
                received += len(block)
                bar.update(len(block))
            bar.close()
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != expected:
            raise _IncompleteError(f"transfer ended after {received} of {expected} bytes")
        if digest.hexdigest() != sha256:
            raise _ChecksumError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                                 "the file was rejected and nothing was cached")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _bar(total: int | None, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
                disable=not enabled, file=sys.stderr)
