"""Where and how tensors compute: device, dtype, native bf16, autocast, seeds, threads, peaks.

Every command resolves `--device auto` and `dtype = "auto"` here, with one rule each, so
pretraining, fine-tuning, generation and serving always agree. This module needs only torch:
the model's CPU fast paths ask it whether this CPU multiplies bf16 natively.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import random
import sys
import time

import numpy as np
import torch

from scratchllm.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; a named device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here: "
                        "use auto or cpu")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"device {name!r} asked for, but MPS is not available here: "
                        "use auto or cpu")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when oneDNN multiplies bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    if os.environ.get("SCRATCHLLM_NATIVE_BF16") == "1":  # force torch's own bf16 kernels
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: torch.device | str) -> bool:
    """True when `device` multiplies bf16 natively (CUDA with bf16, CPUs with AMX/AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_dtype(device: torch.device | str, dtype: str) -> str:
    """'auto' -> 'bfloat16' where bf16 is native (there it is faster), else 'float32'."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    return dtype


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved dtype name."""
    return DTYPES[name]


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast for the forward pass, or nothing in float32."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise UserError("dtype float16 needs CUDA (it needs a grad scaler); use bfloat16")
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from the config."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads for torch's kernels (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def reuse_freed_memory() -> None:
    """Have glibc keep freed memory in the process for the next allocation of that size.

    By default glibc hands every block over 128 KiB (and later its adaptive threshold) back to
    the OS when freed, so each training step maps its activations anew and the kernel zeroes
    every page on first touch: ~20,000 page faults per baby-GPT step, 7-10% of a bf16 step on
    the CPU in same-minute pairs of runs (docs/train.md). With the thresholds raised, a step
    reuses the previous step's memory and its peak memory is unchanged (the same tensors live
    at the same time). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt (musl has a stub)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # glibc caps the mmap threshold (32 MiB on older releases): ask for 1 GiB, else the cap.
    if not mallopt(m_mmap_threshold, 1 << 30):
        mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 2**31 - 1)  # keep up to 2 GiB (mallopt takes an int) for reuse


# Datasheet dense peaks (bf16, fp32) of common GPUs; a CPU's peak is measured instead.
GPU_PEAKS = (("H200", 989e12, 67e12), ("H100", 989e12, 67e12), ("A100", 312e12, 19.5e12),
             ("L4", 121e12, 30e12), ("4090", 165e12, 82e12))


def peak_flops(device: torch.device, dtype: str) -> float:
    """The device's matmul peak FLOP/s for MFU: a datasheet value on known GPUs, measured on a
    CPU (a short GEMM probe), 0 when unknown."""
    low_precision = dtype in ("bfloat16", "float16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16, fp32 in GPU_PEAKS:
            if key in name:
                return bf16 if low_precision else fp32
        return 0.0
    if device.type == "cpu":
        return measure_matmul_flops(dtype)
    return 0.0


@functools.cache
def measure_matmul_flops(dtype: str = "float32", n: int = 1024, seconds: float = 0.25) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) CPU matmul in `dtype`, timed for about `seconds`."""
    # Without native bf16 our Linear runs bf16 as exact fp32 GEMMs: fp32 is then the peak.
    native = dtype in ("bfloat16", "float16") and cpu_has_native_bf16()
    g = torch.Generator().manual_seed(0)  # its own RNG: a run's random stream is untouched
    a = torch.randn(n, n, generator=g).to(DTYPES[dtype] if native else torch.float32)
    b = torch.randn(n, n, generator=g).to(a.dtype)
    for _ in range(2):  # warm-up
        a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_description() -> str:
    """The CPU model and the matmul-relevant flags it has, e.g. 'AMD EPYC (avx2 avx512f ...)'."""
    name, flags = "", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    name = name or platform.processor() or platform.machine()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{name} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"
