"""Greedy generation speed: scratchllm's KV-cache engine vs its cache-less loop vs HF `generate`.

The same random weights for all (ours imported from a GPT2LMHeadModel built from a config,
no hub access), greedy, exactly --new-tokens new tokens from a short prompt (8 tokens), at
batch 1 and batch 8. Ours runs in fp32 and in `--dtype auto`'s dtype (bf16 where the CPU
multiplies bf16 natively), HF in fp32 and, where native, bf16: "vs HF" compares with HF's best.
A decode step is memory-bound: "GB/s" is the bytes a step must read (every matmul weight once,
lm_head included, plus the KV cache of the positions so far) over the step's time, and "of copy"
that as a share of this machine's memory bandwidth, measured first by a STREAM-like copy. Each
decode step is timed (the gap between two consecutive tokens, from our per-step iterator and from
an HF stopping criterion called once per token), and tokens/s is batch / median step time over
--rounds runs of every engine, interleaved: robust to the noise of a shared machine. Time to
first token is the median of 3 runs of one token. The cache-less loop recomputes the whole
sequence every step, so its cost grows with length; it runs --nocache-tokens tokens only (its
median step is then that of a shorter sequence: a generous number for it). Not run by CI.

    python bench/generate.py [--cases baby,gpt2-small] [--batches 1,8] [--new-tokens 500]
                             [--rounds 2] [--threads N] [--profile]

The baby GPT is nanoGPT's character-level one (65 ids, 10.7M parameters) with context_length
512, so that 500 new tokens fit without sliding (HF's GPT-2 cannot go past n_positions).
--profile prints where one decode step of ours spends its time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth, machine, table  # noqa: E402
from scratchllm.generate import GenerationConfig  # noqa: E402
from scratchllm.generate.engine import sample_stream  # noqa: E402
from scratchllm.model import GPTConfig  # noqa: E402
from scratchllm.model.convert import from_hf  # noqa: E402
from scratchllm.model.flops import count_params  # noqa: E402
from scratchllm.runtime import DTYPES, resolve_dtype  # noqa: E402

PROMPT_LEN = 8
# The baby GPT as nanoGPT trains it (10.7M): character-level, 65 ids; context 512 for room
# for 500 new tokens (HF's GPT-2 cannot go past n_positions).
OVERRIDES = {"baby": {"context_length": 512, "vocab_size": 65}}


def models(name: str):
    """(ours, hf) with the same random weights, both in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig.preset(name, **OVERRIDES.get(name, {}))
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)).eval()
    hf.generation_config.eos_token_id = None  # never stop early: exactly N tokens
    hf.generation_config.pad_token_id = 0
    return from_hf(hf).eval(), hf


def ours_steps(model, prompts: list[list[int]], n: int, use_cache: bool) -> tuple[list, list]:
    """(time to first token, per-step times) of our engine, greedy; also returns the ids."""
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, use_cache=use_cache)
    out: list = []
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in sample_stream(model, prompts, cfg, None, out)]
    return [stamps[0] - t0, *(b - a for a, b in zip(stamps, stamps[1:], strict=False))], \
        [c.ids for c in out]


def hf_steps(hf, prompts: list[list[int]], n: int) -> tuple[list, list]:
    """(time to first token, per-step times) of HF generate with its cache, greedy."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # once per new token
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    x = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(x, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          stopping_criteria=StoppingCriteriaList([Clock()]))
    return [stamps[0] - t0, *(b - a for a, b in zip(stamps, stamps[1:], strict=False))], \
        out[:, x.shape[1]:].tolist()


def step_bytes(cfg: GPTConfig, dtype: torch.dtype, batch: int, positions: float) -> float:
    """Bytes one decode step must read: every matmul weight once (the embedding tables are
    only indexed) and each sequence's keys and values for `positions` positions."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = count_params(cfg, embeddings=False) + cfg.vocab_size * cfg.n_embd  # + lm_head
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * positions * batch
    return (weights + kv) * size


def run_case(name: str, batch: int, bandwidth: float, args) -> list[list[object]]:
    """Table rows for one model at one batch size."""
    ours, hf = models(name)
    g = torch.Generator().manual_seed(1)
    # ids from 1: HF generate takes id 0 (its pad_token_id here) in a prompt for padding
    prompts = torch.randint(1, ours.config.vocab_size, (batch, PROMPT_LEN), generator=g).tolist()
    auto = resolve_dtype("cpu", "auto")
    models_by_key = {("ours", "float32"): ours, ("HF", "float32"): hf}
    if auto != "float32":  # bf16 weights where native: --dtype auto's path, and HF's best
        models_by_key[("ours", auto)] = copy.deepcopy(ours).to(DTYPES[auto])
        models_by_key[("HF", auto)] = copy.deepcopy(hf).to(DTYPES[auto])
    runs = {}
    for (impl, dtype), model in models_by_key.items():
        if impl == "ours":
            runs[f"ours, KV cache, {dtype}"] = (dtype, lambda n, m=model: ours_steps(
                m, prompts, n, True))
        else:
            runs[f"HF generate, cache, {dtype}"] = (dtype, lambda n, m=model: hf_steps(
                m, prompts, n))
    if not (name != "baby" and batch > 1):  # too slow to be worth its minutes
        runs["ours, no cache, float32"] = ("float32", lambda n: ours_steps(ours, prompts, n,
                                                                            False))
    for _, run in runs.values():  # warm-up
        run(4)
    first = {k: statistics.median(run(1)[0][0] for _ in range(3))
             for k, (_, run) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    ids = {}
    for _ in range(args.rounds):  # interleaved: a slow minute of a shared machine hits all
        for key, (_, run) in runs.items():
            n = args.nocache_tokens if "no cache" in key else args.new_tokens
            step_times, ids[key] = run(n)
            times[key] += step_times[1:]
    steps = {k: statistics.median(t) for k, t in times.items()}
    same = ids["ours, KV cache, float32"] == ids["HF generate, cache, float32"]
    hf_rate = max(batch / steps[k] for k in runs if k.startswith("HF"))
    rows = []
    for key, (dtype, _) in runs.items():
        rate = batch / steps[key]
        tokens = args.nocache_tokens if "no cache" in key else args.new_tokens
        moved = step_bytes(ours.config, DTYPES[dtype], batch, PROMPT_LEN + tokens / 2) \
            / steps[key]
        share = f"{moved / bandwidth:.0%}" if "no cache" not in key else "-"
        rows.append([name, batch, key, tokens, rate, first[key] * 1000,
                     f"{moved / 1e9:.1f}" if "no cache" not in key else "-", share,
                     rate / hf_rate])
    print(f"  {name} batch {batch}: greedy ids identical to HF (fp32): {same}", file=sys.stderr)
    return rows


def profile_step(name: str) -> None:
    """Where one batch-1 decode step of ours spends its time: aten ops by kind, and Python."""
    from torch.profiler import profile

    ours, _ = models(name)
    dtype = resolve_dtype("cpu", "auto")  # what `--dtype auto` decodes in
    ours = ours.to(DTYPES[dtype])
    cfg = GenerationConfig(max_new_tokens=200, temperature=0.0)
    steps = sample_stream(ours, [list(range(1, PROMPT_LEN + 1))], cfg)
    for _ in range(20):  # warm-up
        next(steps)
    t = time.perf_counter()
    for _ in range(50):
        next(steps)
    wall = (time.perf_counter() - t) / 50 * 1e3  # without the profiler's own overhead
    with profile() as prof:
        for _ in range(50):
            next(steps)
    kinds = {"matmuls (fused qkv, o, MLP, lm_head)": ("aten::addmm", "aten::mm",
                                                     "mkldnn::_linear_pointwise"),
             "attention kernel (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                         "aten::_scaled_dot_product_attention_math"),
             "KV cache writes (index_copy_)": ("aten::index_copy_",)}
    per = dict.fromkeys(kinds, 0.0)
    total = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total / 50 / 1e3
        for kind, names in kinds.items():
            if event.key in names:
                per[kind] += event.self_cpu_time_total / 50 / 1e3
    rows = [[k, v] for k, v in per.items()]
    rows.append(["other aten ops (norms, gelu, adds, mask, views, copies)",
                 total - sum(per.values())])
    rows.append(["Python, modules and dispatch (wall - aten)", wall - total])
    rows.append(["wall time per step (unprofiled)", wall])
    print(f"\n{name}, batch 1, {dtype}: where one decode step of ours goes "
          f"(~{PROMPT_LEN + 90} tokens)")
    print(table(["part", "ms"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="baby,gpt2-small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--nocache-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every engine, interleaved; medians over all their steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also break down one step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    print(f"{machine()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"greedy, prompt {PROMPT_LEN} tokens; memory bandwidth (STREAM-like copy, "
          f"{torch.get_num_threads()} threads): {bandwidth / 1e9:.1f} GB/s\n")
    rows = []
    for name in args.cases.split(","):
        for batch in map(int, args.batches.split(",")):
            rows += run_case(name, batch, bandwidth, args)
    print(table(["model", "batch", "engine", "new tokens", "tokens/s", "first token ms",
                 "GB/s", "of copy", "vs HF best"], rows))
    if args.profile:
        profile_step(args.cases.split(",")[0])


if __name__ == "__main__":
    main()
