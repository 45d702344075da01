"""Run configs: dataclass sections, TOML files, and `--section.key=value` overrides.

A pretraining config has the sections [data], [model], [train], [optim], [eval] and
[checkpoint]. [model] takes a `preset` (see scratchllm.model.PRESETS) plus any GPTConfig
field; its vocab_size comes from the tokenizer. Unknown keys are errors naming the nearest one.
"""

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError
from scratchllm.model import GPTConfig


@dataclass
class DataConfig:
    """What to train on and how to tokenize it."""

    source: str = "shakespeare"  # any `scratchllm prepare` source
    tokenizer: str = "bpe"  # "bpe" or "char" (trained on source), or a tokenizer JSON path
    vocab_size: int = 4096  # for tokenizer = "bpe"
    shards: str = ""  # an already-prepared directory; default RUN_DIR/data
    val_fraction: float = 0.1
    loader: str = "random"  # random (nanoGPT-style windows) | sequential (epochs)


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 2000  # the run's total length; the LR schedule's horizon
    batch_size: int = 12  # sequences per micro-batch
    batch_tokens: int = 0  # tokens per optimizer step; 0 = one micro-batch; else accumulate
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16 (autocast; fp16 CUDA only)
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    nan_policy: str = "stop"  # stop | skip (a non-finite loss skips that step)
    log_every: int = 10
    init_from: str = ""  # a scratchllm checkpoint or HF model directory to start from
    peak_flops: float = 0.0  # hardware peak FLOP/s for MFU; 0 = a guess for the device


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1  # on matrices only (not norms, biases or embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr


@dataclass
class EvalConfig:
    """Evaluation and samples during training."""

    every: int = 250  # steps between evaluations (and at the end); 0 = only at the end
    batches: int = 20  # val batches per evaluation
    prompt: str = "\n"
    sample_tokens: int = 200  # 0 = no sample
    temperature: float = 0.8
    top_k: int = 0  # 0 = off


@dataclass
class CheckpointConfig:
    """Checkpointing."""

    every: int = 500  # steps between checkpoints (and always at the end or on interrupt)
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the best val loss


@dataclass
class RunConfig:
    """A whole pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "nano"})
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of [model] with the tokenizer's vocab_size."""
        spec = dict(self.model)
        preset = spec.pop("preset", None)
        spec["vocab_size"] = vocab_size
        return GPTConfig.preset(preset, **spec) if preset else GPTConfig.from_dict(spec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML (what the run directory keeps)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()
                      if value is not None]
            lines.append("")
        return "\n".join(lines)


SECTIONS = {f.name: f for f in fields(RunConfig)}
MODEL_KEYS = ["preset", *(f.name for f in fields(GPTConfig))]


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML config (or the defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist (presets are in configs/)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path} is not valid TOML: {e}") from None
    config = RunConfig()
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"{path}: top-level key {section!r} must be a [section]"
                            f"{_suggest(section, list(SECTIONS))}")
        for key, value in values.items():
            _set(config, section, key, value, f"{path}: ")
    for override in overrides:
        section, key, value = _parse_override(override)
        _set(config, section, key, value, "")
    return config


def _parse_override(text: str) -> tuple[str, str, Any]:
    """'--train.max_steps=100' -> ('train', 'max_steps', 100); values are read as TOML."""
    body = text[2:] if text.startswith("--") else text
    name, sep, raw = body.partition("=")
    if not sep or "." not in name:
        raise UserError(f"cannot read override {text!r}: write --section.key=value, "
                        "e.g. --train.max_steps=100")
    section, key = name.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --data.source=gutenberg
    return section, key.replace("-", "_"), value


def _set(config: RunConfig, section: str, key: str, value: Any, where: str) -> None:
    if section not in SECTIONS:
        raise UserError(f"{where}unknown config section [{section}]"
                        f"{_suggest(section, list(SECTIONS))}; sections: {', '.join(SECTIONS)}")
    if section == "model":
        if key not in MODEL_KEYS:
            raise UserError(f"{where}unknown key model.{key}{_suggest(key, MODEL_KEYS)}")
        config.model[key] = value
        return
    target = getattr(config, section)
    names = {f.name: f for f in fields(target)}
    if key not in names:
        raise UserError(f"{where}unknown key {section}.{key}{_suggest(key, list(names))}")
    setattr(target, key, _coerce(value, names[key].type, f"{section}.{key}", where))


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _coerce(value: Any, annotation: Any, name: str, where: str) -> Any:
    kind = annotation if isinstance(annotation, type) else _resolve(annotation)
    if kind is bool and isinstance(value, str) and value.lower() in _BOOLS:
        return _BOOLS[value.lower()]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and not isinstance(value, str):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}{name} must be {kind.__name__}, got {value!r}")
    return value


def _resolve(annotation: Any) -> type:
    if isinstance(annotation, str):
        return {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation
