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

A recipe may keep small text files beside the weights: `template.json` names the prompt template
an instruction-tuned model was trained with; `adapter.json` marks a LoRA run, whose
model.safetensors holds only the adapters (and any tensors trained beside them) and whose base
checkpoint it names with its sha256. `load_for_inference` and `load_chat_model` rebuild such a
run on its base (itself possibly a LoRA run) and merge the adapters, so every consumer loads
any checkpoint the same way.
"""

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_bytes, atomic_write_text, read_json_object
from scratchllm.model import GPT
from scratchllm.model.gpt import CONFIG_NAME, WEIGHTS_NAME, save_model_files
from scratchllm.model.gpt import load_config as load_model_config
from scratchllm.model.lora import LoraConfig, apply_lora, load_lora_state_dict, merge_lora
from scratchllm.model.resize import grow_vocab
from scratchllm.runtime import resolve_device, resolve_dtype, torch_dtype
from scratchllm.tokenizer import load_tokenizer

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
PARTIAL = ".partial-"  # being written
OLD = ".old-"  # a complete checkpoint moved aside while a new copy of its step goes in
SHARDED = "sharded"  # a sharded run's weights and optimizer state, one DCP directory
TEMPLATE_FILE = "template.json"  # {"template": NAME}: the prompt template of a tuned model
ADAPTER_FILE = "adapter.json"  # a LoRA run: its [lora] settings and the base it applies to


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


def partial_dir(run_dir: str | Path, step: int) -> Path:
    """Where save_checkpoint writes step's checkpoint before renaming it into place."""
    return Path(run_dir) / CHECKPOINTS / f"{PARTIAL}{step_dir_name(step)}"


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file() or (path / SHARDED).is_dir():
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


def save_checkpoint(run_dir: str | Path, step: int, *, weights: dict[str, torch.Tensor] | None,
                    config, tokenizer, optimizer_state: dict | None, state: dict[str, Any],
                    extra_files: dict[str, str] | None = None,
                    write_shards: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically; return its directory.

    weights: the state dict to keep (the whole model, one gathered from shards, or only an
    adapter's tensors); config: what config.json holds (anything with to_json());
    extra_files: small text files a recipe keeps beside them (e.g. the chat template's name).
    write_shards(dir): a sharded run's collective write of its weights and optimizer state
    into dir/sharded (then weights and optimizer_state may be None).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    partial = partial_dir(run_dir, step)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if write_shards is not None:
        write_shards(partial)
    if weights is not None:
        save_model_files(partial, weights, config)
    else:
        atomic_write_text(partial / CONFIG_NAME, config.to_json())
    tokenizer.save(partial / "tokenizer.json")
    for name, text in (extra_files or {}).items():
        atomic_write_text(partial / name, text)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state or {"state": {},
                                                                   "param_groups": []})
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
    """The tensors of CHECKPOINT/model.safetensors (or of a sharded checkpoint's DCP shards,
    gathered in this process), or a UserError saying what to do."""
    if not (checkpoint / WEIGHTS_NAME).is_file() and (checkpoint / SHARDED).is_dir():
        return _gather_sharded(checkpoint / SHARDED, "model.", device)
    try:
        return load_file(checkpoint / WEIGHTS_NAME, device=str(device))
    except (SafetensorError, OSError) as e:  # damaged or unreadable, not e.g. a bad device
        raise _damaged(checkpoint / WEIGHTS_NAME, e) from None


def _gather_sharded(directory: Path, prefix: str, device) -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` of a DCP checkpoint, read in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(directory))
        entries = reader.read_metadata().state_dict_metadata
        tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in entries.items()
                   if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as e:  # DCP wraps read errors in its own exception types
        raise _damaged(directory, e) from None
    return {key[len(prefix):]: t.to(device) for key, t in tensors.items()}


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer state dict (keyed by parameter index) a full checkpoint holds."""
    file = checkpoint / "training.safetensors"
    try:
        state = json.loads((checkpoint / "training.json").read_text(encoding="utf-8"))
        tensors = load_file(file)
    except (OSError, ValueError, SafetensorError) as e:
        raise _damaged(file, e) from None
    return _unflatten_optimizer(tensors, state["optimizer"])


def load_training_state(checkpoint: Path, optimizer) -> dict[str, Any]:
    """Restore optimizer (unless None: a sharded run loads its own) and RNG states from a
    checkpoint; return training.json's dict."""
    file = checkpoint / "training.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        file = checkpoint / "training.safetensors"
        tensors = load_file(file)
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise _damaged(file, e) from None
    if optimizer is not None:
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
    """(model in eval mode, tokenizer) from a checkpoint or run directory, a LoRA run included.

    device: as runtime.resolve_device ('auto' = CUDA, then MPS, then CPU). dtype: float32 |
    bfloat16 | float16 | auto (bf16 where the hardware multiplies it natively) for the weights
    and the KV cache.
    """
    device = resolve_device(str(device))
    dtype = resolve_dtype(device, dtype)
    checkpoint = find_checkpoint(path)
    model = load_model(checkpoint, device).to(torch_dtype(dtype)).eval()
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return model, tokenizer


def load_chat_model(path: str | Path, device: str | torch.device = "auto",
                    dtype: str = "float32"):
    """(model in eval mode, tokenizer, template name or None) from any checkpoint or run dir:
    a base model, an instruction-tuned one, or a LoRA run (rebuilt on its base)."""
    model, tokenizer = load_for_inference(path, device, dtype)
    return model, tokenizer, read_template(find_checkpoint(path))


def read_template(checkpoint: Path) -> str | None:
    """The template name in CHECKPOINT/template.json, or None when it has none."""
    file = checkpoint / TEMPLATE_FILE
    if not file.is_file():
        return None
    hint = 'it should hold {"template": NAME}: fix it, or delete it and pass --template'
    name = read_json_object(file, hint).get("template")
    if not isinstance(name, str) or not name:
        raise UserError(f"{file}: {hint}")
    return name


def load_model(checkpoint: Path, device: torch.device | str = "cpu") -> GPT:
    """The GPT of one checkpoint directory: its weights, or for a LoRA run its base with the
    adapters (and the tensors trained beside them) loaded and merged, in fp32."""
    adapter_file = checkpoint / ADAPTER_FILE
    if not adapter_file.is_file() and (checkpoint / SHARDED).is_dir() \
            and not (checkpoint / WEIGHTS_NAME).is_file():  # a sharded run, gathered here
        model = GPT(load_model_config(checkpoint)).to(device)
        model.load_weights(load_weights(checkpoint, device))
        return model
    if not adapter_file.is_file():
        return GPT.from_pretrained(checkpoint, device=device)
    adapter = read_json_object(adapter_file, "a LoRA run's adapter.json: retrain or restore it")
    base = lora_base(checkpoint, adapter.get("base_checkpoint", ""), adapter.get("base_sha256"))
    model = load_model(base, device).float()  # a base may itself be a LoRA run
    vocab_size = load_model_config(checkpoint).vocab_size  # a template may have added tokens
    if vocab_size > model.config.vocab_size:
        grow_vocab(model, vocab_size)
    apply_lora(model, LoraConfig(**adapter["lora"]), trainable=adapter.get("trainable", []))
    load_lora_state_dict(model, load_weights(checkpoint, device))
    return merge_lora(model).requires_grad_(True)


def lora_base(run: Path, base: str | Path, sha256: str | None) -> Path:
    """The base checkpoint of the LoRA run `run`, checked: present, and the weights it was
    trained on (a UserError saying what to do otherwise)."""
    base = Path(base)
    if not (base / WEIGHTS_NAME).is_file():
        raise UserError(f"the base model {base} of this LoRA run ({run}) is gone: restore it, "
                        "or use a merged copy (`scratchllm merge`)")
    if weights_sha256(base) != sha256:
        raise UserError(f"the base model {base} changed since this LoRA run ({run}) was "
                        "trained (sha256 differs): use the original base")
    return base
