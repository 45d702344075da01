"""Saving and resuming a run under any layout, with torch.distributed.checkpoint (DCP).

- A run whose parameters are plain tensors (one process, DDP, ZeRO-1) saves the usual
  checkpoint from rank 0 (ZeRO-1 first gathers its optimizer shards there).
- A run whose parameters are DTensors (FSDP, tensor parallel) saves sharded: every rank writes
  its own shards into CHECKPOINT/sharded/ with DCP, and rank 0 the config, tokenizer and
  training.json beside them. With parallel.consolidate a full model.safetensors is added.
Loading goes through DCP's state-dict API, which reshards: a sharded checkpoint resumes under
another world size or layout (or in one process), and a full one loads into a sharded model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchllm import checkpoint as ckpt
from scratchllm.distributed.env import Layout
from scratchllm.distributed.parallelize import is_sharded
from scratchllm.errors import UserError


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{'model': ..., 'optim': ...} as DCP's API gives them (DTensor shards, FQN keys)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if type(optimizer).__name__ == "ZeroRedundancyOptimizer":
        raise UserError("a sharded checkpoint cannot resume under parallel.data = zero1: use "
                        "fsdp or ddp (or resume a zero1 run's own, full checkpoints)")
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_run(layout: Layout, run_dir: Path, step: int, *, model: nn.Module, optimizer,
             weights: Callable[[], dict[str, torch.Tensor]] | None, config, tokenizer,
             state: dict[str, Any], extra_files: dict[str, str]) -> Path:
    """Write step's checkpoint from every rank's share; return its directory (on every rank)."""
    files = dict(config=config, tokenizer=tokenizer, state=state, extra_files=extra_files)
    if not is_sharded(model):
        if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO-1: gather the shards on rank 0
            optimizer.consolidate_state_dict(to=0)
        path = None
        if layout.is_main:
            path = ckpt.save_checkpoint(run_dir, step, optimizer_state=optimizer.state_dict(),
                                        weights=weights() if weights else model.state_dict(),
                                        **files)
        return Path(layout.broadcast(str(path)))
    full = None
    if layout.config.consolidate:  # every rank takes part in the gather; rank 0 keeps it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_options(full_state_dict=True,
                                                            cpu_offload=True))
    shards = sharded_state(model, optimizer)

    def write_shards(directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        layout.barrier()  # rank 0 has made the (empty) partial directory
        dcp.save(shards, checkpoint_id=directory / ckpt.SHARDED)

    path = None
    if layout.is_main:
        path = ckpt.save_checkpoint(run_dir, step, weights=full, optimizer_state=None,
                                    write_shards=write_shards, **files)
    else:
        write_shards(ckpt.partial_dir(run_dir, step))
    return Path(layout.broadcast(str(path)))  # after rank 0 renamed it into place


def load_run(layout: Layout, checkpoint: Path, *, model: nn.Module, optimizer,
             load_weights: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from any checkpoint into this layout; return
    training.json's dict."""
    if (checkpoint / ckpt.SHARDED).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        shards = sharded_state(model, optimizer)
        try:
            dcp.load(shards, checkpoint_id=checkpoint / ckpt.SHARDED)
        except Exception as e:  # DCP raises its own CheckpointException for damaged files
            raise UserError(f"cannot read the sharded checkpoint {checkpoint} ({e}): delete it "
                            "and resume from an earlier one") from None
        set_state_dict(model, optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optim"])
        return ckpt.load_training_state(checkpoint, None)
    weights = ckpt.load_weights(checkpoint, "cpu" if is_sharded(model) else layout.device)
    if not is_sharded(model):
        load_weights(weights)
        return ckpt.load_training_state(checkpoint, optimizer)
    # A full checkpoint into a sharded model: each rank keeps its shard of every tensor.
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = ckpt.load_training_state(checkpoint, None)
    optim_state = ckpt.load_optimizer_state(checkpoint)
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict=_by_name(optim_state, model, optimizer),
                   options=_options(full_state_dict=True, strict=False))
    return state


def _by_name(state: dict, model: nn.Module, optimizer) -> dict:
    """A torch optimizer state dict keyed by parameter index -> keyed by parameter name."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = []
    start = 0
    for saved, live in zip(state["param_groups"], optimizer.param_groups, strict=True):
        n = len(live["params"])
        groups.append({**saved, "params": order[start:start + n]})
        start += n
    return {"state": {order[int(i)]: v for i, v in state["state"].items()},
            "param_groups": groups}
