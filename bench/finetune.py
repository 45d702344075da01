"""Classification fine-tuning on the SMS spam set: full (`last:1`, `all`) vs LoRA.

Each setting runs `finetune classify` (the same code as the CLI) in its own process, so its
peak RSS is its own, on a base checkpoint you give (e.g. the demo's, runs/demo/model). Prints,
per setting: trainable parameters, test accuracy and macro-F1 at the end, the median time of a
training step (steps/s), the whole wall time and the peak RSS, plus the machine line.

    python bench/finetune.py --base runs/demo/model
    python bench/finetune.py --base runs/demo/model --settings last1,lora8 --epochs 3
"""

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import data_dir, torch_header  # noqa: E402

SETTINGS = {
    "last1": ["--classify.trainable=last:1", "--optim.lr=1e-3"],
    "all": ["--classify.trainable=all", "--optim.lr=2e-4", "--classify.dropout=0.1"],
    "lora8": ["--lora.rank=8", "--lora.alpha=16", "--optim.lr=2e-3"],
}


def worker(base: str, overrides: list[str], queue) -> None:
    """Fine-tune once in this process; report what the table shows."""
    import os

    os.environ.setdefault("SCRATCHLLM_DATA_DIR", str(data_dir()))
    from scratchllm.config import load_config
    from scratchllm.finetune.classify import ClassifyConfig, classifier_trainer
    from scratchllm.finetune.lora import count_parameters

    cfg = load_config(None, [f"--classify.checkpoint={base}", *overrides], ClassifyConfig)
    loop = classifier_trainer(cfg, tempfile.mkdtemp(), progress=False, log=lambda *_: None)
    stamps: list[float] = []
    loop.step_callbacks.append(lambda _loop, _step: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    result = loop.run()
    wall = time.perf_counter() - start
    # Step time: between consecutive callbacks, leaving out the ones that also evaluated/saved.
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    step = statistics.median(gaps[: max(1, len(gaps) * 9 // 10)])
    total, trainable = count_parameters(loop.model)
    queue.put({"trainable": trainable, "total": total, "acc": result.last_eval["test_acc"],
               "f1": result.last_eval["test_f1"], "step_s": step, "wall_s": wall,
               "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint or run directory")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    print(torch_header())
    print(f"base: {args.base}; sms-spam (1045 train / 149 val / 300 test), {args.epochs} epochs, "
          "batch 8")
    ctx = mp.get_context("spawn")
    rows = []
    for name in args.settings.split(","):
        queue = ctx.Queue()
        extra = [f"--classify.epochs={args.epochs}", f"--train.threads={args.threads}"]
        proc = ctx.Process(target=worker, args=(args.base, SETTINGS[name] + extra, queue))
        proc.start()
        report = queue.get()
        proc.join()
        rows.append((name, report))
        print(json.dumps({"setting": name, **report}), file=sys.stderr)
    full = dict(rows).get("last1")
    print("\n| setting | trainable | test acc | macro-F1 | steps/s | vs last:1 | wall | "
          "peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        ratio = f"{full['step_s'] / r['step_s']:.2f}x" if full else "-"
        print(f"| {name} | {r['trainable']:,} ({r['trainable'] / r['total']:.1%}) | "
              f"{r['acc']:.2%} | {r['f1']:.3f} | {1 / r['step_s']:.1f} | {ratio} | "
              f"{r['wall_s']:.0f} s | {r['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
