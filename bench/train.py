"""Training-step benchmark: our training loop's step vs HF GPT2LMHeadModel + torch's fused AdamW.

Default: nanoGPT's baby GPT (6 layers, 6 heads, width 384, context 256, batch 8, char-level
tinyshakespeare) on the CPU, fp32 and bf16 autocast (and ours with torch.compile). Every
setting runs in its own process (so peak memory is its own), rounds interleave ours and HF,
and the table shows medians of per-step times. MFU is against this machine's matmul peak for
each dtype, measured at the start (a GEMM probe on a CPU; the datasheet on a GPU). Run:
python bench/train.py [--steps 15 --rounds 3]. bench/gpu.sh runs it for GPT-2 small on a GPU
(--device cuda --preset gpt2-small --context 1024 ...; see there). Extra config overrides go
after `--`, e.g. `-- --data.shards=DIR --data.tokenizer=FILE`.
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

from bench.common import describe_peaks, matmul_peaks, mfu, table, torch_header  # noqa: E402

DATA = ["--data.source=tinyshakespeare", "--data.tokenizer=char", "--eval.sample_tokens=0",
        "--optim.lr=1e-3", "--optim.beta2=0.99"]


def overrides(args) -> list[str]:
    """The config of every setting: data, model shape, batch, device, then the caller's extras."""
    return [*DATA, f"--model.preset={args.preset}", f"--model.context_length={args.context}",
            f"--train.batch_size={args.batch}", f"--train.device={args.device}", *args.extra]


def prepared_data(config: list[str]) -> list[str]:
    """Train the tokenizer and prepare the shards once, for every worker: the overrides that
    point them there (none where the caller passed --data.shards)."""
    if any(o.startswith("--data.shards=") for o in config):
        return []
    from scratchllm.config import load_config
    from scratchllm.train import PretrainConfig
    from scratchllm.train.pretrain import ensure_data

    cfg = load_config(None, config, PretrainConfig)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    _, shards = ensure_data(cfg.data, run_dir, progress=False, log=lambda *_: None)
    tokenizer = run_dir / "tokenizer.json"
    return [f"--data.shards={shards}", *([f"--data.tokenizer={tokenizer}"]
                                          if tokenizer.is_file() else [])]


def worker(impl: str, dtype: str, compile_: bool, steps: int, warmup: int,
           config: list[str]) -> dict:
    """Run warmup + steps training steps in this process; report per-step times."""
    import torch

    from scratchllm.config import load_config
    from scratchllm.runtime import autocast
    from scratchllm.train import PretrainConfig, pretrainer

    cfg = load_config(None, [*config, f"--train.dtype={dtype}", f"--train.compile={compile_}"],
                      PretrainConfig)
    loop = pretrainer(cfg, tempfile.mkdtemp(), progress=False, log=lambda *_: None)
    loop.setup()  # data, model, optimizer, loader exactly as `scratchllm train` builds them
    device, batches = loop.device, loop.recipe.batches
    T, B = loop.model.config.context_length, cfg.train.batch_size
    if impl == "ours":
        step = loop.train_step  # lr schedule, exact accumulation, clipping, fused AdamW
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        mc = loop.model.config
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=mc.vocab_size, n_positions=T, n_embd=mc.n_embd, n_layer=mc.n_layer,
            n_head=mc.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attn_implementation="sdpa")).to(device).train()
        loop.model = loop.train_model = loop.optimizer = loop.recipe.model = None  # free ours
        # The best AdamW torch has for HF too (fused, on CUDA and the CPU), as ours uses, so the
        # ratio measures the model and the loop, not the optimizer.
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                                fused=True)

        def step():
            x, _ = batches.next_batch()
            x = x.to(device)
            with autocast(device, dtype):
                out = hf(input_ids=x, labels=x)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(out.loss)  # wait for the GPU, as our step does

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    import resource

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": times, "tokens": B * T, "peak_mb": peak_mb,
            "flops_per_token": loop.recipe.flops_per_token}


def _fast_bf16() -> bool:
    from scratchllm.runtime import cpu_has_native_bf16

    return cpu_has_native_bf16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default="baby", help="model preset (baby, gpt2-small...)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--settings", help="comma list of IMPL:DTYPE[:compile], e.g. "
                        "hf:bfloat16,ours:bfloat16:compile (default: fp32 and bf16 each side, "
                        "plus ours bf16 + compile)")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "DTYPE", "COMPILE"))
    parser.add_argument("extra", nargs="*", help="config overrides for every setting (after --)")
    args = parser.parse_args()
    if args.worker:
        impl, dtype, compile_ = args.worker
        print(json.dumps(worker(impl, dtype, compile_ == "true", args.steps, args.warmup,
                                overrides(args))))
        return

    if args.settings:
        settings = [(*s.split(":")[:2], "true" if s.endswith(":compile") else "false")
                    for s in args.settings.split(",")]
    else:
        settings = [("hf", "float32", "false"), ("ours", "float32", "false"),
                    ("hf", "bfloat16", "false"), ("ours", "bfloat16", "false")]
        if not args.no_compile:
            settings.append(("ours", "bfloat16", "true"))
    from scratchllm.config import load_config
    from scratchllm.runtime import set_threads
    from scratchllm.train import PretrainConfig

    set_threads(load_config(None, overrides(args), PretrainConfig).train.threads)  # as workers
    print(torch_header(args.device))
    peaks = matmul_peaks(args.device, [s[1] for s in settings])  # before any worker starts
    print(describe_peaks(args.device, peaks))
    data = prepared_data(overrides(args))
    results: dict[tuple, list] = {s: [] for s in settings}
    rss: dict[tuple, float] = {}
    for _ in range(args.rounds):  # interleaved: every setting once per round
        for s in settings:
            warmup = args.warmup + (5 if s[2] == "true" else 0)  # compile warms up longer
            steps = args.steps
            if args.device == "cpu" and s[:2] == ("hf", "bfloat16") and not _fast_bf16():
                steps, warmup = min(steps, 3), 1  # torch's bf16 fallback: ~1 s per step
            shape = ["--device", args.device, "--preset", args.preset, "--context",
                     str(args.context), "--batch", str(args.batch)]
            out = subprocess.run([sys.executable, __file__, "--worker", *s, "--steps",
                                  str(steps), "--warmup", str(warmup), *shape, "--",
                                  *args.extra, *data],
                                 capture_output=True, text=True, check=True,
                                 env=os.environ | {"SCRATCHLLM_DATA_DIR": os.environ.get(
                                     "SCRATCHLLM_DATA_DIR", str(Path(__file__).resolve()
                                                                .parents[2] / "shared/data"))})
            report = json.loads(out.stdout.strip().splitlines()[-1])
            results[s] += [report["tokens"] / t for t in report["times"]]
            rss[s] = max(rss.get(s, 0.0), report["peak_mb"])
            flops = report["flops_per_token"]
    rows = []
    for s in settings:
        tps = statistics.median(results[s])
        hf_runs = [results[k] for k in settings if k[0] == "hf" and k[1] == s[1]]
        vs_hf = f"{tps / statistics.median(hf_runs[0]):.2f}x" if hf_runs else "-"
        name = f"{'scratchllm' if s[0] == 'ours' else 'HF GPT2LMHeadModel'} {s[1]}"
        name += " + compile" if s[2] == "true" else ""
        rows.append([name, f"{tps:,.0f}", vs_hf, mfu(flops, tps, peaks[s[1]]),
                     f"{rss[s]:.0f}"])
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"{args.preset}, batch {args.batch} x {args.context} tokens, {args.device}, "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    print(table(["setting", "tokens/s", "vs HF same dtype", "MFU", memory], rows))


if __name__ == "__main__":
    main()
