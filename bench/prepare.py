"""`prepare` benchmark: MB/s and peak RSS vs tiktoken's raw encode_ordinary_batch.

Corpora: the 13 Gutenberg books (8 MB) and a 200 MB corpus made by repeating them (325
files). The peer is tiktoken's `encode_ordinary_batch` over the same texts with the same
encoding (our tokenizer's), all cores, measured in the same run. Peer and `prepare` runs
alternate, so both medians sample the same load on a shared machine. Run:
python bench/prepare.py
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import data_dir, machine, table  # noqa: E402
from scratchllm.data.prepare import PrepareOptions, prepare  # noqa: E402
from scratchllm.data.shakespeare import shakespeare_plays  # noqa: E402
from scratchllm.tokenizer import Tokenizer  # noqa: E402


def run_process(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `python -m scratchllm ARGS` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scratchllm", *args],
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"scratchllm {' '.join(args)} failed with status {status}")
    return seconds, usage.ru_maxrss / 1024


def prepare_args(corpus: Path, tok: Path, out: Path) -> list[str]:
    return ["prepare", "--data", str(corpus), "--tokenizer", str(tok), "--out", str(out),
            "--force"]


def alternate(peer: Callable[[], object], ours: Callable[[], object], repeats: int
              ) -> tuple[list[float], list[float]]:
    """Wall seconds of peer() and ours(), run in turn `repeats` times after a warm-up."""
    peer()
    peer_times, our_times = [], []
    for _ in range(repeats):
        for fn, times in ((peer, peer_times), (ours, our_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return peer_times, our_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=25, help="repeats for the large corpus")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement")
    args = parser.parse_args()
    import tiktoken

    threads = os.cpu_count() or 1
    print(f"machine: {machine()}; tiktoken {tiktoken.__version__}; {threads} threads\n")
    books = sorted((data_dir() / "gutenberg-books").glob("pg*.txt"))
    texts = [p.read_text(encoding="utf-8") for p in books]
    mb = sum(p.stat().st_size for p in books) / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_path = tmp / "tok.json"
        Tokenizer.train(list(shakespeare_plays().values()), 4096).save(tok_path)
        tok = Tokenizer.load(tok_path)
        small = tmp / "books"
        small.mkdir()
        for p in books:
            shutil.copy(p, small / p.name)
        large = tmp / "large"
        large.mkdir()
        for copy in range(args.copies):
            for p in books:
                (large / f"{copy:03d}-{p.name}").symlink_to(p)
        large_mb = mb * args.copies

        def peer():
            tok.fast.encode_ordinary_batch(texts, num_threads=threads)

        startup = statistics.median(run_process(["prepare", "--help"])[0]
                                    for _ in range(args.repeats))
        peer_small, ours_small = alternate(peer, lambda: prepare(
            [str(small)], tok_path, tmp / "out-small", PrepareOptions(), force=True),
            args.repeats)
        _, rss_small = run_process(prepare_args(small, tok_path, tmp / "out-small"))
        large_runs: list[tuple[float, float, float]] = []  # wall, seconds inside, RSS

        def ours_large():
            wall, rss = run_process(prepare_args(large, tok_path, tmp / "out-large"))
            meta = json.loads((tmp / "out-large" / "meta.json").read_text())
            large_runs.append((wall, meta["seconds"], rss))

        peer_large, _ = alternate(peer, ours_large, args.repeats)

    raw = mb / statistics.median(peer_small + peer_large)
    ours = mb / statistics.median(ours_small)
    fresh = large_mb / statistics.median(run[0] for run in large_runs)
    inside = large_mb / statistics.median(run[1] for run in large_runs)
    rss_large = max(run[2] for run in large_runs)
    rows = [
        ["tiktoken encode_ordinary_batch (8 MB, in memory)", raw, 1.0, "-"],
        ["scratchllm prepare, Gutenberg 8 MB (in-process)", ours, ours / raw,
         f"{rss_small:.0f}"],
        [f"scratchllm prepare, {large_mb:.0f} MB (fresh process)", fresh, fresh / raw,
         f"{rss_large:.0f}"],
        ["  same runs, time inside prepare()", inside, inside / raw, "-"],
    ]
    print(table(["run", "MB/s", "vs tiktoken (target >= 0.8)", "peak RSS MB (target < 500)"],
                rows))
    print(f"\nmedians of {args.repeats} runs, each peer run alternating with a prepare run; "
          f"RSS from fresh `scratchllm prepare` processes.\nstart-up of a fresh `scratchllm "
          f"prepare` process (interpreter and imports, measured with --help): {startup:.2f} s")


if __name__ == "__main__":
    main()
