"""Distributed layouts on this machine: tokens/s, peak memory and communication per rank.

Each layout trains the same model through the real training loop (`pretrainer`, set up by
torchrun exactly as `torchrun -m scratchllm pretrain --parallel.*` does) for --steps steps after
a warmup; every rank reports its step times and peak RSS; the table shows medians, the ratio
to one process, and the bytes each rank sends per step (computed from the layout by
scratchllm.distributed.plan: ring collectives). On one machine with 2 CPU cores, 2 ranks share
the cores a single process uses alone: the figures measure each layout's overhead (as DDP or
FSDP on one GPU would), not a speed-up. Run: python bench/distributed.py [--procs 2 --steps 10]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table, torch_header  # noqa: E402

LAYOUTS = {  # name -> (processes or 0 for --procs, overrides)
    "single process": (1, ["--parallel.data=none"]),
    "ddp": (0, ["--parallel.data=ddp"]),
    "zero1": (0, ["--parallel.data=zero1"]),
    "zero2 (fsdp, no reshard)": (0, ["--parallel.data=fsdp",
                                     "--parallel.reshard_after_forward=false"]),
    "fsdp (zero3)": (0, ["--parallel.data=fsdp"]),
    "tensor parallel": (0, ["--parallel.tensor={procs}"]),
    "tensor parallel + sp": (0, ["--parallel.tensor={procs}", "--parallel.sequence_parallel=true",
                                 "--parallel.loss_parallel=true", "--model.pos_encoding=rope"]),
}


def config(args) -> list[str]:
    return [f"--data.source={args.data}", "--data.tokenizer=bpe", "--data.vocab_size=4096",
            "--data.loader=sequential", f"--model.preset={args.preset}",
            f"--model.context_length={args.context}", f"--train.batch_size={args.batch}",
            f"--train.batch_tokens={args.batch * args.context * args.procs}",
            "--eval.sample_tokens=0", f"--train.device={args.device}"]


def worker(args, overrides: list[str]) -> None:
    """Under torchrun (or alone): warmup + steps of the real loop's train_step; rank 0 prints
    every rank's times and peak memory as JSON."""
    import resource

    import torch

    from scratchllm.config import load_config
    from scratchllm.train import PretrainConfig, pretrainer

    cfg = load_config(None, [*config(args), *overrides], PretrainConfig)
    loop = pretrainer(cfg, tempfile.mkdtemp(), progress=False, log=lambda *_: None)
    loop.setup()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loop.train_step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    layout = loop.layout
    if loop.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = layout.data_size * cfg.train.batch_size * loop.model.config.context_length \
        * loop.recipe.accumulation
    report = {"times": times, "peak_mb": peak, "tokens": tokens}
    reports = [report]
    if layout.distributed:
        import torch.distributed as dist

        reports = [None] * layout.world_size
        dist.all_gather_object(reports, report)
    if layout.is_main:
        print(json.dumps({"ranks": reports, "accumulation": loop.recipe.accumulation,
                          "model": loop.model.config.to_dict()}))
    layout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    parser.add_argument("--data", default="tinyshakespeare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layouts", help="comma list of names (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args, args.extra)
        return
    from scratchllm.config import load_config
    from scratchllm.distributed.plan import Layout, communication_bytes
    from scratchllm.model import GPTConfig
    from scratchllm.train import PretrainConfig
    from scratchllm.train.pretrain import ensure_data

    print(torch_header(args.device))
    cfg = load_config(None, config(args), PretrainConfig)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    _, shards = ensure_data(cfg.data, data_dir, progress=False, log=lambda *_: None)
    shared = [f"--data.shards={shards}"]
    names = args.layouts.split(",") if args.layouts else list(LAYOUTS)
    rows, base = [], None
    for name in names:
        procs, overrides = LAYOUTS[name]
        procs = procs or args.procs
        overrides = [o.format(procs=args.procs) for o in overrides] + shared
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={procs}"] if procs > 1 else [sys.executable])
        cmd = [*launcher, __file__, "--procs", str(args.procs), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--preset", args.preset, "--context",
               str(args.context), "--batch", str(args.batch), "--data", args.data,
               "--device", args.device, "--worker", "--", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(max((os.cpu_count() or 1) // procs, 1))}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            errors = [line for line in out.stderr.splitlines() if "Error" in line] or ["?"]
            rows.append([name, procs, "failed: " + errors[-1].strip()[-80:], "", "", ""])
            continue
        report = json.loads(out.stdout.strip().splitlines()[-1])
        step = statistics.median(max(r["times"][i] for r in report["ranks"])
                                 for i in range(args.steps))
        tps = report["ranks"][0]["tokens"] / step
        base = base or tps
        model = GPTConfig.from_dict(report["model"])
        data_size = procs // (args.procs if "tensor" in name else 1)
        kind = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "fsdp": "fsdp"}
        layout = Layout(next((v for k, v in kind.items() if name.startswith(k)), "none"),
                        data_size, args.procs if "tensor" in name else 1,
                        sequence_parallel="sp" in name, loss_parallel="sp" in name)
        comm = communication_bytes(model, args.batch, layout, "float32",
                                   report["accumulation"])
        rows.append([name, procs, f"{tps:,.0f}", f"{tps / base:.2f}x",
                     f"{max(r['peak_mb'] for r in report['ranks']):.0f}",
                     f"{comm / 2**20:.1f}"])
    print(f"{args.preset}, context {args.context}, micro-batch {args.batch} per rank, global "
          f"batch {args.batch * args.procs} sequences, fp32, {args.steps} steps, medians")
    print(table(["layout", "ranks", "tokens/s", "vs 1 process", "peak RSS MB per rank",
                 "sent MB/step per rank"], rows))


if __name__ == "__main__":
    main()
