"""Checkpoints: self-contained directories, written atomically, with exact training state.

Every stage uses this one module: training loops save and resume here; generate, chat, serve
and fine-tuning load models here.

RUN_DIR/checkpoints/step-000500/
    model.safetensors, config.json   the model's weights (any state dict) and its config
    tokenizer.json                   the tokenizer
    training.safetensors             optimizer tensors and torch/NumPy RNG states
    training.json                    step, optimizer hyper-parameters, data-loader position,
                                     Python RNG state, best val loss, the run config

A checkpoint is written into `.partial-step-000500/` and renamed into place when complete,
so a crash (even SIGKILL) mid-write leaves the previous checkpoints intact; the newest
complete `step-*` directory is the one to resume from. Replacing an existing step moves the
old copy aside (`.old-step-000500/`) before renaming the new one in, and deletes it after;
`recover_checkpoints` (run at every start) puts an old copy back if a kill came in between.
"""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_bytes, atomic_write_text
from scratchllm.model import GPT
from scratchllm.model.gpt import WEIGHTS_NAME, save_model_files
from scratchllm.runtime import resolve_device, resolve_dtype, torch_dtype
from scratchllm.tokenizer import load_tokenizer

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
PARTIAL = ".partial-"  # being written
OLD = ".old-"  # a complete checkpoint moved aside while a new copy of its step goes in


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1]
    raise UserError(f"{path} is neither a checkpoint directory (with model.safetensors) nor a "
                    "run directory with checkpoints; train one with `scratchllm pretrain`")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        meta["state"][str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(index)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, as tensors + JSON."""
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), None],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what rng_state saved."""
    version, internal, _ = meta["python"]
    random.setstate((version, tuple(internal), None))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: str | Path, step: int, *, weights: dict[str, torch.Tensor],
                    config, tokenizer, optimizer_state: dict, state: dict[str, Any],
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically; return its directory.

    weights: the state dict to keep (the whole model, one gathered from shards, or only an
    adapter's tensors); config: what config.json holds (anything with to_json());
    extra_files: small text files a recipe keeps beside them (e.g. the chat template's name).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    partial = root / f"{PARTIAL}{step_dir_name(step)}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model_files(partial, weights, config)
    tokenizer.save(partial / "tokenizer.json")
    for name, text in (extra_files or {}).items():
        atomic_write_text(partial / name, text)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    rng_tensors, rng_meta = rng_state()
    atomic_write_bytes(partial / "training.safetensors", save({**opt_tensors, **rng_tensors}))
    atomic_write_text(partial / "training.json", json.dumps(
        {**state, "step": step, "optimizer": opt_meta, "rng": rng_meta}, indent=1) + "\n")
    _fsync_dir(partial)
    # Replace atomically: a complete directory sits under the final name, or (for an instant)
    # under the old-copy name, at every moment; recover_checkpoints() puts it back after a kill.
    old = root / f"{OLD}{step_dir_name(step)}"
    if final.exists():  # re-saving a step (a run resumed from an earlier checkpoint)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _damaged(file: Path, error: Exception) -> UserError:
    """The one-line error for a damaged checkpoint file, naming what to fall back to."""
    checkpoint = file.parent
    earlier = [p for p in list_checkpoints(checkpoint.parent.parent)
               if step_of(p) < step_of(checkpoint)] if checkpoint.name.startswith(PREFIX) else []
    fallback = (f"resume from {earlier[-1]} (--resume {earlier[-1]})" if earlier
                else "start a new run")
    return UserError(f"{file} is damaged ({error}); delete {checkpoint} and {fallback}")


def step_of(checkpoint: Path) -> int:
    """The step of a `step-N` checkpoint directory."""
    return int(checkpoint.name[len(PREFIX):])


def weights_sha256(checkpoint: Path) -> str:
    """The sha256 of a checkpoint's model.safetensors (what a LoRA run was trained on)."""
    from scratchllm.data.download import sha256_file

    return sha256_file(checkpoint / WEIGHTS_NAME)


def load_weights(checkpoint: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of CHECKPOINT/model.safetensors, or a UserError saying what to do."""
    try:
        return load_file(checkpoint / WEIGHTS_NAME, device=str(device))
    except (SafetensorError, OSError) as e:  # damaged or unreadable, not e.g. a bad device
        raise _damaged(checkpoint / WEIGHTS_NAME, e) from None


def load_training_state(checkpoint: Path, optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG states from a checkpoint; return training.json's dict."""
    file = checkpoint / "training.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        file = checkpoint / "training.safetensors"
        tensors = load_file(file)
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise _damaged(file, e) from None
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    set_rng_state(tensors, state["rng"])
    return state


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: set[str]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those named in `keep`."""
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def recover_checkpoints(run_dir: str | Path) -> None:
    """After a crash: delete half-written checkpoints, and put back a complete one that was
    moved aside (killed between the two renames of a replacement)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for path in root.glob(f"{OLD}*"):
        final = root / path.name[len(OLD):]
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, final)
    for path in root.glob(f"{PARTIAL}*"):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: str = "float32"):
    """(model in eval mode, tokenizer) from a checkpoint or run directory.

    device: as runtime.resolve_device ('auto' = CUDA, then MPS, then CPU). dtype: float32 |
    bfloat16 | float16 | auto (bf16 where the hardware multiplies it natively) for the weights
    and the KV cache.
    """
    device = resolve_device(str(device))
    dtype = resolve_dtype(device, dtype)
    checkpoint = find_checkpoint(path)
    model = GPT.from_pretrained(checkpoint, device=device).to(torch_dtype(dtype)).eval()
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return model, tokenizer
