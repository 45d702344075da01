"""Where this process sits in a run: torchrun's environment, the process group and the mesh.

A run started with plain `python`/`scratchllm` is one process and needs no process group;
under torchrun every rank reads RANK/WORLD_SIZE/LOCAL_RANK and joins one group. The ranks
form a 2-D mesh ("data", "tensor"): ranks of one tensor group hold shards of the same layers
and see the same batch; ranks of one data group see different batches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scratchllm.distributed.config import ParallelConfig
from scratchllm.errors import UserError
from scratchllm.runtime import resolve_device


@dataclass
class Layout:
    """This rank's place in the run; a single process is the layout with world_size 1."""

    config: ParallelConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    data_rank: int = 0
    data_size: int = 1  # ranks that see different batches (DDP/ZeRO/FSDP)
    tensor_size: int = 1
    mesh: Any = None  # DeviceMesh ("data", "tensor"), None for a single process

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes metrics and the non-sharded checkpoint files."""
        return self.rank == 0

    @property
    def data_layout(self) -> str:
        """The data-parallel layout in effect: 'none' when one rank holds all the data."""
        return self.config.data if self.data_size > 1 else "none"

    @property
    def can_generate(self) -> bool:
        """Token-by-token decoding cannot split a one-token step over sequence-parallel ranks."""
        return not (self.tensor_size > 1 and self.config.sequence_parallel)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum_over_data(self, value: float) -> float:
        """value summed over the data-parallel ranks (the global batch's total)."""
        if self.data_size == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh["data"].get_group())
        return float(t)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, last: bool) -> Iterator[None]:
        """One accumulation micro-step: gradients are synchronised on the last one only, and
        the loss may read vocabulary-sharded logits."""
        with contextlib.ExitStack() as stack:
            if hasattr(model, "no_sync") and not last:  # DDP
                stack.enter_context(model.no_sync())
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(last)
            if self.config.loss_parallel and self.tensor_size > 1:
                from torch.distributed.tensor.parallel import loss_parallel

                stack.enter_context(loss_parallel())
            yield

    def close(self) -> None:
        """Leave the process group (at the end of a run)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while another still uses them
            dist.destroy_process_group()


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup_layout(config: ParallelConfig, device: str = "auto") -> Layout:
    """Join torchrun's process group (if launched by it) and build the (data, tensor) mesh."""
    rank, world, local_rank = torchrun_world()
    if world == 1:
        if config.tensor > 1:
            raise UserError(f"parallel.tensor = {config.tensor} needs that many processes: "
                            f"launch with `torchrun --nproc-per-node {config.tensor} -m "
                            "scratchllm ...`")
        return Layout(config, resolve_device(device))
    if world % config.tensor:
        raise UserError(f"parallel.tensor = {config.tensor} does not divide the {world} "
                        "processes: choose a divisor of the world size")
    data_size = world // config.tensor
    if data_size > 1 and config.data == "none":
        raise UserError(f"{world} processes with parallel.data = none and parallel.tensor = "
                        f"{config.tensor}: set parallel.data (ddp, zero1, fsdp) or "
                        f"parallel.tensor = {world}")
    if config.tensor > 1 and data_size > 1 and config.data != "fsdp":
        raise UserError("tensor parallelism composes with parallel.data = fsdp only (DDP and "
                        "ZeRO-1 do not take tensor-parallel DTensor parameters)")
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    elif torch_device.type != "cpu":
        raise UserError(f"distributed training runs on CUDA or the CPU, not {torch_device}")
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=torch_device
                                if torch_device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch_device.type, (data_size, config.tensor),
                            mesh_dim_names=("data", "tensor"))
    return Layout(config, torch_device, rank, world, mesh["data"].get_local_rank(), data_size,
                  config.tensor, mesh)
