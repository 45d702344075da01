"""Helpers shared by the benchmarks: machine description, medians, data mirror, tables."""

import hashlib
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data mirror (SCRATCHLLM_DATA_DIR, default ../shared/data)."""
    return Path(os.environ.get("SCRATCHLLM_DATA_DIR", REPO.parent / "shared" / "data"))


def machine() -> str:
    """CPU model, cores and Python version, for the header of every benchmark."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [header, *[[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tiktoken_gpt2(encoder_json: Path, vocab_bpe: Path, cache: Path):
    """tiktoken's own gpt2 encoding, offline: its download cache is seeded from local files."""
    import tiktoken
    from tiktoken_ext import openai_public  # noqa: F401  (registers the URLs we mirror)

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    cache.mkdir(parents=True, exist_ok=True)
    for path in (encoder_json, vocab_bpe):
        shutil.copy(path, cache / hashlib.sha1((base + path.name).encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
