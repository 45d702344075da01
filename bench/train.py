"""Training-step benchmark: our training loop's step vs HF GPT2LMHeadModel and vs a minimal
plain-PyTorch GPT (nanoGPT's recipe, written below), each with torch's fused AdamW.

Default: nanoGPT's baby GPT (6 layers, 6 heads, width 384, context 256, batch 8, char-level
tinyshakespeare) on the CPU, fp32 and bf16 autocast (and ours with torch.compile). Every
setting runs in its own process (so peak memory is its own), rounds interleave the settings,
and the table shows medians of per-step times. A setting is IMPL[+VARIANT...]:DTYPE[:compile],
IMPL one of ours, hf, nano; variants of ours switch one optimisation off to measure it
(VARIANTS below), and nano+heap / hf+heap give a peer our malloc setting. MFU is against
this machine's matmul peak for each dtype, measured at the start (a GEMM probe on a CPU; the
datasheet on a GPU). Run:
python bench/train.py [--steps 15 --rounds 3]. bench/gpu.sh runs it for GPT-2 small on a GPU
(--device cuda --preset gpt2-small --context 1024 ...; see there). Extra config overrides go
after `--`, e.g. `-- --data.shards=DIR --data.tokenizer=FILE`; the peers follow
`--model.mlp=gelu_exact` (the erf GELU, nanoGPT's own choice) with their own exact GELU.
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


class NanoGPT:
    """The peer: nanoGPT's model in plain PyTorch, same shape as ours (built inside worker()
    so that torch is imported there): fused QKV, SDPA causal attention, GELU (tanh, or exact
    for mlp="gelu_exact" as in nanoGPT itself), tied embeddings, F.cross_entropy."""

    @staticmethod
    def build(mc, device):
        import torch
        import torch.nn.functional as F
        from torch import nn

        approximate = "tanh" if mc.mlp == "gelu" else "none"

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                C = mc.n_embd
                self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
                self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
                self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

            def forward(self, x):
                B, T, C = x.shape
                q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
                q, k, v = (t.view(B, T, mc.n_head, -1).transpose(1, 2) for t in (q, k, v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
                return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=approximate))

        class GPT(nn.Module):
            def __init__(self):
                super().__init__()
                self.wte = nn.Embedding(mc.vocab_size, mc.n_embd)
                self.wpe = nn.Embedding(mc.context_length, mc.n_embd)
                self.h = nn.ModuleList(Block() for _ in range(mc.n_layer))
                self.ln_f = nn.LayerNorm(mc.n_embd)
                self.lm_head = nn.Linear(mc.n_embd, mc.vocab_size, bias=False)
                self.lm_head.weight = self.wte.weight

            def forward(self, idx, targets):
                pos = torch.arange(idx.shape[1], device=idx.device)
                x = self.wte(idx) + self.wpe(pos)
                for block in self.h:
                    x = block(x)
                logits = self.lm_head(self.ln_f(x))
                return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

        return GPT().to(device).train()


# Variants of ours: each switches one optimisation off (for what it is worth, measured).
VARIANTS = {
    "unpadded": "CUDA: lm_head's output not padded to a multiple of 64 columns",
    "flash": "CPU bf16 training: torch's flash attention kernel (not bf16 GEMMs up to 512 keys)",
    "ce": "F.cross_entropy instead of our one-pass fp32 cross-entropy (model/loss.py)",
    "heap": "glibc's default malloc thresholds (not runtime.reuse_freed_memory); on a peer, "
            "+heap gives it ours",
}


def apply_variants(impl: str, variants: list[str]) -> None:
    """Switch the named optimisations of ours off in this (worker) process. A peer runs as its
    users run it (glibc's default malloc), unless given +heap."""
    import torch.nn.functional as F

    from scratchllm.model import fastpath, loss
    from scratchllm.train import loop

    if (impl == "ours") == ("heap" in variants):  # loop.setup() would call it
        loop.reuse_freed_memory = lambda: None

    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
        if v == "unpadded":
            fastpath.CUDA_OUTPUT_ALIGN = 1
        if v == "flash":
            fastpath.SHORT_BF16_ATTENTION = 0
        if v == "ce":
            loss._CrossEntropySum.apply = staticmethod(
                lambda x, t, ignore: F.cross_entropy(x.float(), t, ignore_index=ignore,
                                                     reduction="sum"))


def worker(impl: str, dtype: str, compile_: bool, steps: int, warmup: int,
           config: list[str]) -> dict:
    """Run warmup + steps training steps in this process; report per-step times."""
    import torch

    from scratchllm.config import load_config
    from scratchllm.runtime import autocast
    from scratchllm.train import PretrainConfig, pretrainer

    impl, *variants = impl.split("+")
    apply_variants(impl, variants)
    cfg = load_config(None, [*config, f"--train.dtype={dtype}", f"--train.compile={compile_}"],
                      PretrainConfig)
    loop = pretrainer(cfg, tempfile.mkdtemp(), progress=False, log=lambda *_: None)
    loop.setup()  # data, model, optimizer, loader exactly as `scratchllm train` builds them
    device, batches = loop.device, loop.recipe.batches
    T, B = loop.model.config.context_length, cfg.train.batch_size
    if impl == "ours":
        step = loop.train_step  # lr schedule, exact accumulation, clipping, fused AdamW
    else:
        mc = loop.model.config
        loop.model = loop.train_model = loop.optimizer = loop.recipe.model = None  # free ours
        if impl == "hf":
            from transformers import GPT2Config, GPT2LMHeadModel

            peer = GPT2LMHeadModel(GPT2Config(
                vocab_size=mc.vocab_size, n_positions=T, n_embd=mc.n_embd, n_layer=mc.n_layer,
                n_head=mc.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                activation_function="gelu_new" if mc.mlp == "gelu" else "gelu",
                attn_implementation="sdpa")).to(device).train()

            def loss_of(x, y):
                return peer(input_ids=x, labels=x).loss  # HF shifts the labels itself
        else:
            peer = NanoGPT.build(mc, device)
            loss_of = peer
        forward = torch.compile(loss_of) if compile_ else loss_of
        # The best AdamW torch has for the peers too (fused, on CUDA and the CPU), as ours
        # uses, so the ratio measures the model and the loop, not the optimizer.
        opt = torch.optim.AdamW(peer.parameters(), lr=1e-3, betas=(0.9, 0.99),
                                weight_decay=0.1, fused=True)

        def step():
            x, y = (t.to(device) for t in batches.next_batch())
            with autocast(device, dtype):
                loss = forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss)  # wait for the GPU, as our step does

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
        settings = [("hf", "float32", "false"), ("nano", "float32", "false"),
                    ("ours", "float32", "false"), ("hf", "bfloat16", "false"),
                    ("nano", "bfloat16", "false"), ("ours", "bfloat16", "false")]
        if not args.no_compile:
            settings += [("nano", "bfloat16", "true"), ("ours", "bfloat16", "true")]
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
            if args.device == "cpu" and s[0] != "ours" and s[1] == "bfloat16" \
                    and not _fast_bf16():
                steps, warmup = min(steps, 3), 1  # torch's bf16 fallback: ~1 s per step
            shape = ["--device", args.device, "--preset", args.preset, "--context",
                     str(args.context), "--batch", str(args.batch)]
            out = subprocess.run([sys.executable, __file__, "--worker", *s, "--steps",
                                  str(steps), "--warmup", str(warmup), *shape, "--",
                                  *args.extra, *data],
                                 capture_output=True, text=True,
                                 env=os.environ | {"SCRATCHLLM_DATA_DIR": os.environ.get(
                                     "SCRATCHLLM_DATA_DIR", str(Path(__file__).resolve()
                                                                .parents[2] / "shared/data"))})
            if out.returncode != 0:  # report it and go on: the other settings still count
                tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
                print(f"setting {':'.join(s)} failed: {tail[0]}", file=sys.stderr)
                continue
            report = json.loads(out.stdout.strip().splitlines()[-1])
            results[s] += [report["tokens"] / t for t in report["times"]]
            rss[s] = max(rss.get(s, 0.0), report["peak_mb"])
            flops = report["flops_per_token"]
    rows = []
    settings = [s for s in settings if results[s]]  # those that ran
    for s in settings:
        tps = statistics.median(results[s])
        ratios = []
        for peer in ("hf", "nano"):  # the peer's best run in this dtype (compiled or not)
            runs = [statistics.median(results[k]) for k in settings
                    if k[0] == peer and k[1] == s[1]]
            ratios.append(f"{tps / max(runs):.2f}x" if runs else "-")
        impl, *variants = s[0].split("+")
        name = {"ours": "scratchllm", "hf": "HF GPT2LMHeadModel", "nano": "nanoGPT-style"}[impl]
        sign = "-" if impl == "ours" else "+"  # a variant switches ours off, gives a peer ours
        name += "".join(f" {sign}{v}" for v in variants) + f" {s[1]}"
        name += " + compile" if s[2] == "true" else ""
        rows.append([name, f"{tps:,.0f}", *ratios, mfu(flops, tps, peaks[s[1]]),
                     f"{rss[s]:.0f}"])
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"{args.preset}, batch {args.batch} x {args.context} tokens, {args.device}, "
          f"{args.rounds} rounds x {args.steps} steps, medians; vs a peer = vs its best "
          "setting in the same dtype")
    print(table(["setting", "tokens/s", "vs HF", "vs nanoGPT-style", "MFU", memory], rows))
    for v in sorted({v for s in settings for v in s[0].split("+")[1:]}):
        print(f"-{v}: {VARIANTS[v]}")


if __name__ == "__main__":
    main()
