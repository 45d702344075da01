"""The [parallel] config section: how one run is laid out over processes (torchrun ranks)."""

from dataclasses import dataclass

from scratchllm.config import check_choice, check_range
from scratchllm.errors import UserError

DATA_LAYOUTS = ("none", "ddp", "zero1", "fsdp")


@dataclass
class ParallelConfig:
    """Data and tensor parallelism; the world size comes from torchrun (WORLD_SIZE)."""

    data: str = "ddp"  # none | ddp | zero1 | fsdp; used when more than one rank holds data
    tensor: int = 1  # tensor-parallel degree (Megatron-style); data ranks = world / tensor
    reshard_after_forward: bool = True  # fsdp: True = ZeRO-3, False = ZeRO-2-like (more memory)
    sequence_parallel: bool = False  # tensor > 1: norms and dropout shard the sequence
    loss_parallel: bool = False  # tensor > 1: the loss reads vocabulary-sharded logits
    param_dtype: str = "auto"  # fsdp: parameters in compute (auto = train.dtype); fp32 reduce
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    consolidate: bool = False  # sharded runs: also write a full model.safetensors per save

    def check(self) -> None:
        """Names and ranges, checked when the config is loaded."""
        check_choice("parallel.data", self.data, DATA_LAYOUTS)
        check_range("parallel.tensor", self.tensor, 1)
        check_choice("parallel.param_dtype", self.param_dtype, ("auto", "float32", "bfloat16"))
        check_choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        if self.tensor == 1 and (self.sequence_parallel or self.loss_parallel):
            raise UserError("parallel.sequence_parallel and parallel.loss_parallel need "
                            "parallel.tensor > 1")
