"""Distributed training on PyTorch's own engine: torchrun, DTensor, FSDP2, DDP and DCP.

`env.setup_layout` joins torchrun's process group and builds the (data, tensor) mesh;
`parallelize.parallelize` lays a built model out (TP, AC, compile, FSDP/DDP) from outside;
`checkpoint` saves and resumes under any layout (sharded with DCP, resharding on load);
`plan` estimates the memory of each layout before a run.
"""
