"""parallelize(): one function applies every layout to a built model, from outside it.

torchtitan's order: tensor parallelism (DTensor plans on the projections), then activation
checkpointing, then compile, then data parallelism (FSDP2 `fully_shard` per block and the root,
or DDP). The model's code never changes and the training loop never branches on the layout:
it trains what this returns and saves the model it built.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchllm.distributed.env import Layout
from scratchllm.errors import UserError
from scratchllm.runtime import torch_dtype


def parallelize(model: nn.Module, layout: Layout, activation_checkpointing: bool = False,
                compile: bool = False, dtype: str = "float32") -> nn.Module:
    """Apply TP, AC, compile, then FSDP/DDP; return the module to train (forward/backward)."""
    cfg = layout.config
    if layout.tensor_size > 1:
        tensor_parallel(model, layout)
    if activation_checkpointing:
        checkpoint_blocks(model)
    data = layout.data_layout
    if compile:
        # Per block under FSDP (each block's all-gather stays outside its graph), else whole.
        for block in (_gpt(model).blocks if data == "fsdp" else [model]):
            block.compile()
    if data == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        param_dtype = dtype if cfg.param_dtype == "auto" else cfg.param_dtype
        policy = MixedPrecisionPolicy(param_dtype=torch_dtype(param_dtype),
                                      reduce_dtype=torch.float32)
        mesh = layout.mesh["data"]
        for block in _gpt(model).blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    if data in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [layout.device.index] if layout.device.type == "cuda" else None
        # Gradients as views into DDP's buckets: no second copy of them (what plan.py counts).
        return DistributedDataParallel(model, device_ids=device_ids,
                                       process_group=layout.mesh["data"].get_group(),
                                       gradient_as_bucket_view=True)
    return model


def _gpt(model: nn.Module) -> nn.Module:
    """The GPT inside a task model (a classifier keeps it as .gpt), or the model itself."""
    return getattr(model, "gpt", model)


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: a GPT's blocks (inside a task model too), or an encoder-decoder's
    encoder and decoder layers."""
    inner = _gpt(model)
    if hasattr(inner, "blocks"):
        return list(inner.blocks)
    return [*inner.encoder_blocks, *inner.decoder_blocks]


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (names kept)."""
    from torch.utils.checkpoint import checkpoint

    for block in _transformer_blocks(model):
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def tensor_parallel(model: nn.Module, layout: Layout) -> None:
    """Megatron-style plan: q/k/v and MLP up/gate colwise, attention out and MLP down rowwise,
    the embedding and the output layer sharded over the vocabulary; optional sequence
    parallelism for the norms and a vocabulary-parallel loss."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    cfg, tp = layout.config, layout.tensor_size
    gpt = _gpt(model)
    c = gpt.config
    for name, value in (("n_head", c.n_head), ("n_kv_head", c.n_kv_head),
                        ("mlp_hidden", c.mlp_hidden)):
        if value % tp:
            raise UserError(f"model.{name} = {value} is not divisible by parallel.tensor = {tp}:"
                            " choose a tensor degree that divides it")
    # The embedding and output layer shard over the vocabulary when it divides evenly (pad
    # vocabularies to a multiple of 64 or 128 as GPT-2's 50304 does); else they replicate.
    shard_vocab = c.vocab_size % tp == 0
    if cfg.loss_parallel and not shard_vocab:
        raise UserError(f"parallel.loss_parallel needs a vocabulary divisible by "
                        f"parallel.tensor = {tp}, not {c.vocab_size}")
    sp = cfg.sequence_parallel
    if sp and c.pos_encoding in ("learned", "sinusoidal"):
        raise UserError("parallel.sequence_parallel needs rope, alibi or no position encoding "
                        "(absolute positions are added to the whole sequence)")
    mesh = layout.mesh["tensor"]
    residual = Shard(1) if sp else Replicate()  # the residual stream between blocks
    lm_plan = ColwiseParallel(input_layouts=residual,
                              output_layouts=Shard(-1) if cfg.loss_parallel else Replicate(),
                              use_local_output=not cfg.loss_parallel)
    top = {}
    if shard_vocab:
        top["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
        if gpt is model and hasattr(model, "lm_head"):
            top["lm_head"] = lm_plan
    elif sp:  # a replicated embedding's output is cut into this rank's part of the sequence
        top["tok_emb"] = PrepareModuleOutput(output_layouts=Replicate(),
                                             desired_output_layouts=Shard(1))
    if sp:
        top["norm_f"] = SequenceParallel()
    parallelize_module(gpt, mesh, top)
    for block in gpt.blocks:
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                "attn.v_proj": ColwiseParallel(),
                "attn.o_proj": RowwiseParallel(output_layouts=residual),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=residual)}
        if hasattr(block.mlp, "gate_proj"):
            plan["mlp.gate_proj"] = ColwiseParallel()
        if sp:
            # Attention and the MLP read the whole sequence: gather it (attention's other
            # arguments, the shared AttnInputs and the cache, pass through).
            plan.update({"norm1": SequenceParallel(), "norm2": SequenceParallel(),
                         "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                    desired_input_layouts=(Replicate(), None,
                                                                           None)),
                         "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),))})
        parallelize_module(block, mesh, plan)
    # What no plan covers (norms without sequence parallelism, position tables, a task head)
    # is replicated: every parameter becomes a DTensor on the mesh, as FSDP and clipping need.
    planned = {id(p) for m in gpt.modules() for p in m.parameters(recurse=False)
               if _is_dtensor(p)}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in planned]
        if own:
            distribute_module(module, mesh, input_fn=_replicate_inputs,
                              output_fn=_local_outputs)
    if c.tie_embeddings and hasattr(gpt, "lm_head"):
        gpt.lm_head.weight = gpt.tok_emb.weight  # each was distributed on its own: re-tie
    if cfg.loss_parallel and "lm_head" in top:
        # Training reads the vocabulary-sharded logits (the loss under loss_parallel);
        # evaluation and sampling (eval mode) get ordinary full logits.
        gpt.lm_head.register_forward_hook(
            lambda module, args, out: out if module.training else out.full_tensor())
    gpt.shard_heads(mesh.get_local_rank(), tp)


def _replicate_inputs(module, inputs, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(x.redistribute(mesh, [Replicate()]) if _is_dtensor(x) else
                 DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                 if isinstance(x, torch.Tensor) else x for x in inputs)


def _local_outputs(module, outputs, mesh):
    return outputs.to_local() if _is_dtensor(outputs) else outputs


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True under FSDP or tensor parallelism (DTensor parameters): saved with DCP.

    Also resharded FSDP modules: after a forward without backward (the last evaluation),
    reshard_after_forward=False leaves the full parameters in place of the shards.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp:
        module.reshard()
    return bool(fsdp) or any(_is_dtensor(p) for p in model.parameters())


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm; return the norm before clipping.

    Works for plain and DTensor (FSDP / tensor-parallel) gradients alike: a DTensor's norm is
    reduced over the ranks that hold its shards, a plain tensor's is local (replicated).
    """
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    local = [g for g in grads if not _is_dtensor(g)]
    squares = 0.0
    if sharded:
        norm = get_total_norm(sharded, foreach=True)
        squares += float(norm.full_tensor() if _is_dtensor(norm) else norm) ** 2
    if local:
        squares += float(get_total_norm(local, foreach=True)) ** 2
    total = squares ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for group in (sharded, local):
            if group:
                torch._foreach_mul_(group, coef)
    return total
