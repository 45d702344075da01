"""Training-step benchmark: our trainer's step vs HF GPT2LMHeadModel + torch AdamW.

nanoGPT's baby GPT (6 layers, 6 heads, width 384, context 256, batch 8, char-level
tinyshakespeare), fp32 and bf16 autocast (and ours with torch.compile). Every setting runs
in its own process (so peak RSS is its own), rounds interleave ours and HF, and the table
shows medians of per-step times. Run: python bench/train.py [--steps 15 --rounds 3]
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

from bench.common import machine, table  # noqa: E402

BABY = ["--data.source=tinyshakespeare", "--data.tokenizer=char", "--model.preset=baby",
        "--model.context_length=256", "--train.batch_size=8", "--eval.sample_tokens=0",
        "--optim.lr=1e-3", "--optim.beta2=0.99"]
PEAK = {"float32": 3.0e11, "bfloat16": 1.2e12}  # this machine's measured matmul peaks


def worker(impl: str, dtype: str, compile_: bool, steps: int, warmup: int) -> dict:
    """Run warmup + steps training steps in this process; report per-step times."""
    import torch

    from scratchllm.config import load_config
    from scratchllm.train import Trainer
    from scratchllm.train.setup import autocast

    tmp = tempfile.mkdtemp()
    cfg = load_config(None, [*BABY, f"--train.dtype={dtype}", f"--train.compile={compile_}"])
    trainer = Trainer(cfg, tmp, progress=False, log=lambda *_: None)
    trainer._setup()  # data, model, optimizer, loader exactly as `pretrain` builds them
    T, B = cfg.model_config(trainer.tokenizer.vocab_size).context_length, cfg.train.batch_size
    if impl == "ours":
        step = trainer._train_step
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        mc = trainer.model_config
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=mc.vocab_size, n_positions=T, n_embd=mc.n_embd, n_layer=mc.n_layer,
            n_head=mc.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
        del trainer.model, trainer.train_model, trainer.optimizer  # free ours
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        device = torch.device("cpu")

        def step():
            x, y = trainer.loader.next_batch()
            with autocast(device, dtype):
                out = hf(input_ids=x, labels=x)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flops = trainer.flops_per_token
    return {"times": times, "tokens": B * T, "rss_mb": rss, "flops_per_token": flops}


def _fast_bf16() -> bool:
    from scratchllm.model.layers import _cpu_has_fast_bf16

    return _cpu_has_fast_bf16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "DTYPE", "COMPILE"))
    args = parser.parse_args()
    if args.worker:
        impl, dtype, compile_ = args.worker
        print(json.dumps(worker(impl, dtype, compile_ == "true", args.steps, args.warmup)))
        return

    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    settings = [("hf", "float32", "false"), ("ours", "float32", "false"),
                ("hf", "bfloat16", "false"), ("ours", "bfloat16", "false")]
    if not args.no_compile:
        settings.append(("ours", "bfloat16", "true"))
    results: dict[tuple, list] = {s: [] for s in settings}
    rss: dict[tuple, float] = {}
    for _ in range(args.rounds):  # interleaved: every setting once per round
        for s in settings:
            warmup = args.warmup + (5 if s[2] == "true" else 0)  # compile warms up longer
            steps = args.steps
            if s[:2] == ("hf", "bfloat16") and not _fast_bf16():
                steps, warmup = min(steps, 3), 1  # torch's bf16 fallback: ~1 s per step
            out = subprocess.run([sys.executable, __file__, "--worker", *s, "--steps",
                                  str(steps), "--warmup", str(warmup)],
                                 capture_output=True, text=True, check=True,
                                 env=os.environ | {"SCRATCHLLM_DATA_DIR": os.environ.get(
                                     "SCRATCHLLM_DATA_DIR", str(Path(__file__).resolve()
                                                                .parents[2] / "shared/data"))})
            report = json.loads(out.stdout.strip().splitlines()[-1])
            results[s] += [report["tokens"] / t for t in report["times"]]
            rss[s] = max(rss.get(s, 0.0), report["rss_mb"])
            flops = report["flops_per_token"]
    rows = []
    for s in settings:
        tps = statistics.median(results[s])
        hf = statistics.median(results[("hf", s[1], "false")])
        name = f"{'scratchllm' if s[0] == 'ours' else 'HF GPT2LMHeadModel'} {s[1]}"
        name += " + compile" if s[2] == "true" else ""
        rows.append([name, f"{tps:,.0f}", f"{tps / hf:.2f}x", f"{flops * tps / PEAK[s[1]]:.1%}",
                     f"{rss[s]:.0f}"])
    print(f"baby GPT (10.7M), batch 8 x 256 tokens, {args.rounds} rounds x {args.steps} steps, "
          "medians")
    print(table(["setting", "tokens/s", "vs HF same dtype", "MFU", "peak RSS MB"], rows))


if __name__ == "__main__":
    main()
