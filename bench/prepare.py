"""`prepare` benchmark: MB/s and peak RSS vs tiktoken's raw encode_ordinary_batch.

Corpora: the 13 Gutenberg books (8 MB) and a 200 MB corpus made by repeating them (325
files). The peer is tiktoken's `encode_ordinary_batch` over the same texts with the same
encoding (our tokenizer's), all cores, measured in the same run. Run: python bench/prepare.py
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import data_dir, machine, median_time, table  # noqa: E402
from scratchllm.data.prepare import PrepareOptions, prepare  # noqa: E402
from scratchllm.data.shakespeare import shakespeare_plays  # noqa: E402
from scratchllm.tokenizer import Tokenizer  # noqa: E402


def run_prepare_process(corpus: Path, tok: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `scratchllm prepare` in a fresh process."""
    cmd = [sys.executable, "-m", "scratchllm", "prepare", "--data", str(corpus), "--tokenizer",
           str(tok), "--out", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"prepare failed with status {status}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=25, help="repeats for the large corpus")
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

        t_raw = median_time(lambda: tok.fast.encode_ordinary_batch(texts, num_threads=threads), 3)
        t_ours = median_time(lambda: prepare([str(small)], tok_path, tmp / "out-small",
                                             PrepareOptions(), force=True), 3)
        _, rss_small = run_prepare_process(small, tok_path, tmp / "out-small")
        t_large, rss_large = run_prepare_process(large, tok_path, tmp / "out-large")

    raw = mb / t_raw
    rows = [
        ["tiktoken encode_ordinary_batch (8 MB, in memory)", raw, 1.0, "-"],
        ["scratchllm prepare, Gutenberg 8 MB", mb / t_ours, mb / t_ours / raw,
         f"{rss_small:.0f}"],
        [f"scratchllm prepare, {large_mb:.0f} MB (1 run, fresh process)", large_mb / t_large,
         large_mb / t_large / raw, f"{rss_large:.0f}"],
    ]
    print(table(["run", "MB/s", "vs tiktoken (target >= 0.8)", "peak RSS MB (target < 500)"],
                rows))
    print("\n8 MB rows: median of 3 after a warm-up; RSS from a fresh `scratchllm prepare` process")


if __name__ == "__main__":
    main()
