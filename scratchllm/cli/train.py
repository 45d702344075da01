"""`scratchllm pretrain` and `scratchllm plot`."""

import argparse
import sys
from pathlib import Path

NEXT_STEPS = """next:
  scratchllm generate --checkpoint {run} --prompt "ROMEO:"    # sample more
  scratchllm plot {run}                                         # the loss curve
  {longer}   # train longer"""


def _rerun_command(argv: list[str], max_steps: int | None = None) -> str:
    """The pretrain command line again, with --resume (and a new --max-steps if given)."""
    import shlex

    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--max-steps" and max_steps is not None:
            skip = True
            continue
        if arg.startswith(("--max-steps=", "--train.max_steps=")) and max_steps is not None:
            continue
        args.append(arg)
    if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
        args.append("--resume")
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    return shlex.join(["scratchllm", *args])


def register_pretrain(commands) -> None:
    """Add `scratchllm pretrain`."""
    p = commands.add_parser(
        "pretrain", help="pretrain a GPT on a corpus",
        description="Pretrain a GPT. Every config key can be overridden as "
                    "--section.key=value (e.g. --train.max_steps=500 --model.n_layer=8).")
    p.add_argument("--config", type=Path, help="TOML config (presets in configs/)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (= train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint interval (= checkpoint.every)")
    p.add_argument("--log-every", type=int, help="metrics interval (= train.log_every)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|DIR",
                   help="continue the run in --out (auto, the default) or from a run or "
                        "checkpoint directory")
    p.set_defaults(handler=cmd_pretrain, accepts_overrides=True)


def register_plot(commands) -> None:
    """Add `scratchllm plot`."""
    p = commands.add_parser("plot", help="draw a run's loss curve",
                            description="Write RUN_DIR/loss.png from RUN_DIR/metrics.jsonl.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", type=Path, help="PNG file (default RUN_DIR/loss.png)")
    p.set_defaults(handler=cmd_plot)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from scratchllm.config import load_config
    from scratchllm.train import PretrainConfig, pretrainer

    overrides = list(args.overrides)
    for flag, key in (("max_steps", "train.max_steps"), ("save_every", "checkpoint.every"),
                      ("log_every", "train.log_every")):
        if getattr(args, flag) is not None:
            overrides.append(f"--{key}={getattr(args, flag)}")
    config = load_config(args.config, overrides, PretrainConfig)
    loop = pretrainer(config, args.out, resume=args.resume, progress=sys.stderr.isatty(),
                      log=lambda message: print(message, file=sys.stderr))
    result = loop.run()
    if "sample" in result.last_eval:
        print(f"\n--- sample at step {result.step} ---\n{result.last_eval['sample']}\n")
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}\nresume with: "
              f"{_rerun_command(args.argv)}", file=sys.stderr)
        return 130
    print(NEXT_STEPS.format(run=args.out, longer=_rerun_command(args.argv, 2 * result.step)))
    return 0


def cmd_plot(args: argparse.Namespace) -> None:
    from scratchllm.train.metrics import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
