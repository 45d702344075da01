"""Helpers shared by the benchmarks: machine description, medians, data mirror, tables."""

import hashlib
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scratchllm.runtime import (
    cpu_description,
    cpu_has_native_bf16,
    measure_matmul_flops,
    peak_flops,
)

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data mirror (SCRATCHLLM_DATA_DIR, default ../shared/data)."""
    return Path(os.environ.get("SCRATCHLLM_DATA_DIR", REPO.parent / "shared" / "data"))


def machine() -> str:
    """CPU model and its matmul flags, cores and Python version, for every benchmark's header."""
    return f"{cpu_description()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def torch_header(device: str = "cpu") -> str:
    """The machine line plus torch's version and threads (and the GPU), for torch benchmarks."""
    line = f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        line += f"; {torch.cuda.get_device_name()}"
    return line


def matmul_peaks(device: str, dtypes: list[str], seconds: float = 1.0) -> dict[str, float]:
    """Each dtype's matmul peak FLOP/s for MFU, measured here and now on a CPU (a GEMM probe,
    the best of `seconds` of products: longer than the trainer's, as other work may be running);
    a GPU's datasheet value."""
    if torch.device(device).type == "cpu":
        return {d: measure_matmul_flops(d, seconds=seconds) for d in dict.fromkeys(dtypes)}
    return {d: peak_flops(torch.device(device), d) for d in dict.fromkeys(dtypes)}


def copy_bandwidth(mib: int = 512, repeats: int = 10) -> float:
    """Memory bandwidth in bytes/s, STREAM's copy kernel: b[:] = a over arrays far larger than
    any cache, bytes read + bytes written per second, the best of `repeats` on torch's threads."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * a.element_size() / best


def describe_peaks(device: str, peaks: dict[str, float]) -> str:
    """One line saying what MFU is measured against."""
    if device.startswith("cuda"):
        how = "the GPU's datasheet dense peak"
    else:
        how = f"best 1024^3 GEMM on {torch.get_num_threads()} threads"
        if not cpu_has_native_bf16() and any(d != "float32" for d in peaks):
            how += "; no native bf16 here, so bf16's peak is fp32's (our bf16 runs fp32 GEMMs)"
    values = ", ".join(f"{d} {p / 1e9:,.0f} GFLOP/s" if p else f"{d} unknown"
                       for d, p in peaks.items())
    return f"matmul peak for MFU: {values} ({how})"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> str:
    """MFU as a percentage string, or '-' where the peak is unknown."""
    return f"{flops_per_token * tokens_per_s / peak:.1%}" if peak else "-"


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
