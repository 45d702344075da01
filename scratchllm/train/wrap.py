"""Wrappers applied to a built model from outside: activation checkpointing, then compile.

Both keep parameter names unchanged, so checkpoints and state_dict keys stay clean, and the
training loop never branches on which were applied.
"""

import torch

from scratchllm.train.config import TrainConfig


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Apply activation checkpointing, then compile, from outside the model.

    Both keep parameter names unchanged: checkpointing wraps each block's forward on the
    instance, and compile is in place (`module.compile()`), so state_dict keys stay clean.
    """
    if cfg.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for block in model.blocks:
            forward = block.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = checkpointed
    if cfg.compile:
        model.compile()
    return model
