"""Serving under load: `scratchllm serve` on loopback, N concurrent streaming clients for M seconds.

For each server setting (--slots 8: continuous batching; --slots 1: one request at a time, the
rest queued) the server runs as its own process; N client threads each send streaming
/v1/completions requests back to back for M seconds (then finish the one in flight; every
request is bounded by --max-tokens and a timeout). Reported: requests/s, generated tokens/s,
time to first token and inter-token latency (p50 / p95, from the SSE chunks as the client sees
them), errors (target: 0) and the server's peak RSS (VmHWM). Then Hugging Face `generate` on the
same weights (exported with scratchllm.model.convert.to_hf), in this process without HTTP: one
request at a time, and N prompts as one static batch, the same new tokens per request.

The model is the demo's shape (4 layers, 4 heads, 256 wide, 4096-token BPE vocabulary, context
128) with random weights (speed does not depend on them), GPT-2 style (learned positions) so
that transformers can load it; or --checkpoint DIR. Loopback only; not run by CI.

    python bench/serve.py [--clients 8] [--seconds 30] [--max-tokens 96] [--prompt-tokens 16]
                          [--threads 2] [--checkpoint DIR] [--no-hf] [--tiny]

--tiny: a 1-layer 32-wide model, 2 clients, 3 seconds, 8 tokens (checks that the script runs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO, data_dir, table, torch_header  # noqa: E402
from scratchllm.model import GPT, GPTConfig  # noqa: E402
from scratchllm.tokenizer import Tokenizer  # noqa: E402

DEMO_SHAPE = dict(vocab_size=4096, context_length=128, n_layer=4, n_head=4, n_embd=256,
                  pos_encoding="learned", norm="layernorm", mlp="gelu")
TINY_SHAPE = dict(DEMO_SHAPE, n_layer=1, n_head=2, n_embd=32)


@dataclass
class Load:
    """What the clients saw."""

    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


def make_model(args: argparse.Namespace, out: Path) -> Path:
    """A checkpoint directory: --checkpoint's, or random weights of the demo's shape."""
    if args.checkpoint is not None:
        return args.checkpoint
    text = (data_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tok = Tokenizer.train([text[:300_000]], vocab_size=4096)
    shape = TINY_SHAPE if args.tiny else DEMO_SHAPE
    torch.manual_seed(0)
    GPT(GPTConfig(**shape)).save_pretrained(out)
    tok.save(out / "tokenizer.json")
    return out


def prompts(checkpoint: Path, n: int, length: int) -> list[list[int]]:
    """n different prompts of `length` tokens: consecutive pieces of Shakespeare."""
    from scratchllm.checkpoint import find_checkpoint
    from scratchllm.tokenizer import load_tokenizer

    tok = load_tokenizer(find_checkpoint(checkpoint) / "tokenizer.json")
    text = (data_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    ids = tok.encode(text[:200_000])
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def start_server(checkpoint: Path, port: int, slots: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchllm", "serve", "--checkpoint", str(checkpoint),
         "--port", str(port), "--slots", str(slots), "--max-queue", "256",
         "--threads", str(threads), "--device", "cpu", "--model-name", "bench",
         "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            get(port, "/health")
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited at start") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def one_request(port: int, prompt: list[int], max_tokens: int, seed: int, load: Load,
                lock: threading.Lock) -> None:
    """One streaming completion; record its latencies, tokens or error into `load`."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.8, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    times, tokens, error = [], 0, None
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            error = f"HTTP {response.status}: {response.read()[:200]!r}"
        else:
            for line in response:  # SSE: `data: {...}` lines, blank lines between
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
        conn.close()
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    with lock:
        if error is not None:
            load.errors.append(error)
            return
        load.requests += 1
        load.tokens += tokens
        if times:
            load.ttft.append(times[0] - start)
            load.gaps += [b - a for a, b in zip(times, times[1:], strict=False)]


def run_load(port: int, pool: list[list[int]], args: argparse.Namespace) -> Load:
    """args.clients threads sending requests back to back for args.seconds."""
    load, lock = Load(), threading.Lock()
    stop_at = time.perf_counter() + args.seconds

    def client(c: int) -> None:
        i = 0
        while time.perf_counter() < stop_at and i < args.max_requests:
            prompt = pool[(c + i * args.clients) % len(pool)]
            one_request(port, prompt, args.max_tokens, c * 1000 + i, load, lock)
            i += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.seconds = time.perf_counter() - start
    return load


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_row(name: str, checkpoint: Path, slots: int, pool: list[list[int]],
              args: argparse.Namespace) -> tuple[list[object], float]:
    port = args.port + slots
    proc = start_server(checkpoint, port, slots, args.threads)
    try:
        warm = Load()
        one_request(port, pool[0], 4, 0, warm, threading.Lock())  # first-call costs
        load = run_load(port, pool, args)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rate = load.tokens / load.seconds
    row = [name, load.requests / load.seconds, rate, *ms(load.ttft), *ms(load.gaps),
           len(load.errors), f"{rss:.0f}"]
    for error in sorted(set(load.errors))[:3]:
        print(f"  {name} error: {error}", file=sys.stderr)
    return row, rate


def ms(values: list[float]) -> list[str]:
    """p50 and p95 in milliseconds."""
    if len(values) < 2:
        return ["-", "-"]
    q = statistics.quantiles(values, n=20)
    return [f"{statistics.median(values) * 1000:.1f}", f"{q[18] * 1000:.1f}"]


def hf_rows(checkpoint: Path, pool: list[list[int]], args: argparse.Namespace
            ) -> list[tuple[list[object], float]]:
    """HF generate on the same weights: one request at a time, then one static batch."""
    from transformers import AutoModelForCausalLM

    from scratchllm.checkpoint import load_for_inference
    from scratchllm.errors import UserError
    from scratchllm.model.convert import to_hf

    model, _ = load_for_inference(checkpoint, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            to_hf(model, tmp)
        except UserError as e:
            print(f"HF generate skipped: {e}", file=sys.stderr)
            return []
        hf = AutoModelForCausalLM.from_pretrained(tmp).eval()
    torch.set_num_threads(args.threads)
    hf.generation_config.pad_token_id = 0
    n = args.max_tokens
    options = dict(do_sample=True, temperature=0.8, top_k=0, max_new_tokens=n,
                   min_new_tokens=n)
    rows = []
    with torch.inference_mode():
        hf.generate(torch.tensor([pool[0]]), **dict(options, max_new_tokens=4, min_new_tokens=4))
        requests, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds and requests < args.max_requests:
            hf.generate(torch.tensor([pool[requests % len(pool)]]), **options)
            requests += 1
        seconds = time.perf_counter() - start
        rows.append((["HF generate, batch 1", requests / seconds, requests * n / seconds,
                      "-", "-", "-", "-", 0, "-"], requests * n / seconds))
        batch = torch.tensor(pool[:args.clients])  # equal lengths: no padding needed
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds and batches * args.clients < \
                args.max_requests:
            hf.generate(batch, attention_mask=torch.ones_like(batch), **options)
            batches += 1
        seconds = time.perf_counter() - start
        done = batches * args.clients
        rows.append(([f"HF generate, static batch {args.clients}", done / seconds,
                      done * n / seconds, "-", "-", "-", "-", 0, "-"], done * n / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client (bound)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port", type=int, default=8700, help="base port (+ slots)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.seconds, args.max_tokens = 2, 3.0, 8
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_model(args, Path(tmp))
        pool = prompts(checkpoint, 64, args.prompt_tokens)
        print(torch_header())
        print(f"{args.clients} clients x {args.seconds:g} s, prompts of {args.prompt_tokens} "
              f"tokens, {args.max_tokens} new tokens each (sampled, T=0.8), server threads "
              f"{args.threads}, fp32, loopback")
        results = [serve_row(f"serve --slots {args.clients}", checkpoint, args.clients, pool,
                             args),
                   serve_row("serve --slots 1", checkpoint, 1, pool, args)]
        if not args.no_hf:
            results += hf_rows(checkpoint, pool, args)
    header = ["setting", "req/s", "tok/s", "TTFT p50 ms", "p95", "ITL p50 ms", "p95",
              "errors", "peak RSS MiB"]
    print(table(header, [row for row, _ in results]))
    batched = results[0][1]
    for (row, rate) in results[1:]:
        print(f"batched serving vs {row[0]}: {batched / rate:.2f}x tokens/s")


if __name__ == "__main__":
    main()
