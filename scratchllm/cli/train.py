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
    if not result.is_main:  # under torchrun rank 0 reports
        return 0
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


PLAN_DESCRIPTION = """Estimate the memory per rank of a pretraining config under every layout
(single process, DDP, ZeRO-1, ZeRO-2, FSDP/ZeRO-3, tensor parallel, each with and without
activation checkpointing) before running it, and the largest micro-batch that fits. The model
comes from the config's [model] (or --model PRESET); the micro-batch from train.batch_size."""


def register_plan(commands) -> None:
    """Add `scratchllm plan`."""
    p = commands.add_parser("plan", help="plan memory per rank for each parallel layout",
                            description=PLAN_DESCRIPTION)
    p.add_argument("--config", type=Path, help="a pretraining TOML config")
    p.add_argument("--model", metavar="PRESET", help="a model preset instead of [model] "
                   "(e.g. gpt2-medium, tinyllama-1.1b)")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="ranks (default 1)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per rank, e.g. 80GB or 24GiB")
    p.add_argument("--vocab-size", type=int, help="vocabulary (default: the model's)")
    p.set_defaults(handler=cmd_plan, accepts_overrides=True)


def _size(text: str) -> float:
    """'80GB' / '24GiB' / '512MB' -> bytes (GB and GiB both read as 2**30, as GPUs are sold)."""
    import re

    from scratchllm.errors import UserError

    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT])i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-memory {text!r}: write a size such as 80GB or 24GiB")
    return float(match[1]) * 1024 ** "KMGT".index(match[2].upper()) * 1024


def cmd_plan(args: argparse.Namespace) -> int:
    from scratchllm.config import load_config
    from scratchllm.distributed.plan import format_plan
    from scratchllm.errors import UserError
    from scratchllm.model import GPTConfig
    from scratchllm.train import PretrainConfig

    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give at least 1")
    cfg = load_config(args.config, args.overrides, PretrainConfig)
    if args.model:
        model = GPTConfig.preset(args.model, **({"vocab_size": args.vocab_size}
                                                if args.vocab_size else {}))
    else:
        model = cfg.model_config(args.vocab_size or cfg.data.vocab_size)
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else "bfloat16"
    memory = _size(args.gpu_memory) if args.gpu_memory else None
    print(format_plan(model, cfg.train.batch_size, args.gpus, memory, dtype))
    return 0
