"""Training-step throughput and peak memory: scratchllm's GPT vs Hugging Face GPT2LMHeadModel.

Both models get the same config and the same weights (ours is imported from the HF one), the
same batch, and the same work: forward, fp32 cross-entropy over B*T targets, backward. Steps
alternate between the two models (interleaved, so machine noise hits both alike); the table shows
medians after one warm-up step each. MFU is against this machine's matmul peak for each dtype,
measured at the start (a GEMM probe). Not run by CI.

    python bench/model.py [--cases nano,baby] [--dtypes fp32,bf16] [--repeats 3] [--batch 8]

Peak memory is the growth of the process's resident set during one step (activations, gradients,
temporaries; the parameters are already resident), read from /proc with the high-water mark reset
before the step. For that glibc must hand freed blocks back to the OS (mallopt's fixed mmap
threshold), which slows allocation: so memory is measured last, in one extra step per model,
after every timing.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import describe_peaks, matmul_peaks, mfu, torch_header  # noqa: E402
from scratchllm.model import GPT, GPTConfig, flops_per_token  # noqa: E402
from scratchllm.model.convert import from_hf  # noqa: E402
from scratchllm.runtime import cpu_has_native_bf16  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtypes names: runtime's names


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_returns_memory() -> bool:
    """Make glibc serve (and free) every block over 64 KiB with mmap, so RSS tracks live memory."""
    libc = _libc()
    return libc is not None and libc.mallopt(-3, 65536) == 1  # M_MMAP_THRESHOLD, fixed


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def hf_twin(cfg: GPTConfig):
    """A randomly initialised GPT2LMHeadModel with the same shape as cfg (no hub access)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length,
                        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_inner=cfg.mlp_hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(hf_cfg)


def make_step(model, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    """One training step's forward + backward for either model; returns the loss."""
    is_ours = isinstance(model, GPT)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if is_ours:
                _, loss = model(x, y)
            else:  # HF shifts the labels itself: same targets, last position ignored
                loss = model(x, labels=x).loss
        loss.backward()
        return loss.item()

    return step


def measure(step) -> float | None:
    """Peak resident growth (MiB) during one call of step, or None where /proc can't tell."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # free heap pages back to the OS: RSS = live memory
    if not _reset_peak():
        return None
    rss0 = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    return None if peak is None or rss0 is None else (peak - rss0) / 1024


def setup(name: str, batch: int):
    """Both models with the same weights, and one batch of inputs and targets."""
    cfg = GPTConfig.preset(name)
    torch.manual_seed(0)
    hf = hf_twin(cfg).train()
    ours = from_hf(hf).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), generator=g)
    y = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return {"ours": ours, "hf": hf}, x, y


def time_case(name: str, dtypes: list[str], repeats: int, models, x, y) -> list[dict]:
    """Interleaved median throughput of one preset at every dtype."""
    cfg = GPTConfig.preset(name)
    rows = []
    for dtype in dtypes:
        steps = {k: make_step(m, x, y, dtype == "bf16") for k, m in models.items()}
        losses = {k: s() for k, s in steps.items()}  # warm-up, and a check both compute the same
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        for r in range(repeats):
            for key in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                t0 = time.perf_counter()
                steps[key]()
                times[key].append(time.perf_counter() - t0)
        tokens = x.numel()
        row = dict(model=name, dtype=dtype, tokens=tokens,
                   loss_diff=abs(losses["ours"] - losses["hf"]))
        for key in models:
            row[f"{key}_tps"] = tokens / statistics.median(times[key])
        row["flops_per_token"] = flops_per_token(cfg, x.shape[1])
        rows.append(row)
        steps_s = {k: " ".join(f"{t:.3f}" for t in v) for k, v in times.items()}
        print(f"  {name} {dtype}: step seconds ours [{steps_s['ours']}], HF [{steps_s['hf']}]",
              file=sys.stderr, flush=True)
    return rows


def memory_case(rows: list[dict], models, x, y) -> None:
    """Fill in each row's peak step memory for both (warm) models, one step each."""
    for row in rows:
        for key, model in models.items():
            mib = measure(make_step(model, x, y, row["dtype"] == "bf16"))
            row[f"{key}_mib"] = float("nan") if mib is None else mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="nano,baby", help="comma-separated presets")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_grad_enabled(True)
    t0 = time.perf_counter()
    cases, dtypes = args.cases.split(","), args.dtypes.split(",")
    print(torch_header())
    peaks = matmul_peaks("cpu", [DTYPES[d] for d in dtypes])  # before the models exist
    print(describe_peaks("cpu", peaks), flush=True)
    setups = {name: setup(name, args.batch) for name in cases}
    rows = {name: time_case(name, dtypes, args.repeats, *setups[name]) for name in cases}
    tracked = _malloc_returns_memory()  # only now: it slows allocation down
    for name in cases:
        memory_case(rows[name], *setups[name])

    native = "yes" if cpu_has_native_bf16() else "no (bf16 GEMMs run as exact fp32 GEMMs)"
    print(f"\nnative bf16 matmul: {native}; transformers {transformers.__version__}, python "
          f"{platform.python_version()}; batch {args.batch}, seq = preset context; "
          f"median of {args.repeats} interleaved steps after 1 warm-up")
    print("step = zero_grad + forward + fp32 cross-entropy + backward (no optimizer); peak MiB = "
          "resident growth during one step" + ("" if tracked else " (not tracked here)") + "\n")
    head = ("| model | dtype | tokens/step | ours tok/s | HF tok/s | speed ours/HF | "
            "ours peak MiB | HF peak MiB | memory ours/HF | ours GFLOP/s | ours MFU | "
            "HF MFU | loss diff |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in (r for name in cases for r in rows[name]):
        peak = peaks[DTYPES[r["dtype"]]]
        print(f"| {r['model']} | {r['dtype']} | {r['tokens']} | {r['ours_tps']:.0f} | "
              f"{r['hf_tps']:.0f} | {r['ours_tps'] / r['hf_tps']:.2f}x | {r['ours_mib']:.0f} | "
              f"{r['hf_mib']:.0f} | {r['ours_mib'] / r['hf_mib']:.2f} | "
              f"{r['flops_per_token'] * r['ours_tps'] / 1e9:.1f} | "
              f"{mfu(r['flops_per_token'], r['ours_tps'], peak)} | "
              f"{mfu(r['flops_per_token'], r['hf_tps'], peak)} | {r['loss_diff']:.1e} |")
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
