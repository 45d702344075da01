"""Run observability: metrics.jsonl, optional TensorBoard, and the loss-curve plot."""

import json
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_text

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (and TensorBoard)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, log=print):
        self.path, self.log = Path(run_dir) / METRICS, log
        if resume_step is not None:
            self.truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.tensorboard = _tensorboard(run_dir)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resumed run writes them again)."""
        if not self.path.is_file():
            return
        records, torn = _parse(self.path.read_text(encoding="utf-8", errors="replace"))
        if torn:  # a line cut short by a crash or power loss: drop it, keep the rest
            self.log(f"warning: dropped {torn} unreadable line(s) of {self.path} (a write cut "
                     "short by a crash)")
        kept = [json.dumps(r) for r in records if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a run directory?")
    return _parse(path.read_text(encoding="utf-8", errors="replace"))[0]


def _parse(text: str) -> tuple[list[dict[str, Any]], int]:
    """(the records of metrics.jsonl text, the number of unreadable lines skipped)."""
    records, torn = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    return records, torn


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train and val loss against step into RUN_DIR/loss.png (or `out`)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        raise UserError(f"{run_dir}/{METRICS} has no loss records to plot yet")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
