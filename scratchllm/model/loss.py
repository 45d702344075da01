"""Language-model loss: fp32 cross-entropy, summed, divided by the number of real targets."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # targets equal to this (padding, prompt tokens) carry no loss


class _CrossEntropySum(torch.autograd.Function):
    """sum over real targets of -log_softmax(x)[target], in fp32, with a one-pass gradient.

    Same value as F.cross_entropy(reduction="sum"), but it keeps only the logits for backward
    (no log-softmax, which would add an (N, V) tensor while the caller still holds the logits)
    and never builds a zero-filled (N, V) gradient: backward is softmax(x) - onehot(target),
    in one tensor. Both passes are torch's fused, vectorised (log_)softmax kernels: logsumexp
    plus a broadcast x - lse[:, None] was ~40% slower on CPU.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int  # type: ignore[override]
                ) -> Tensor:
        x = logits.float()  # (N, V); a no-op for fp32 logits
        valid = targets != ignore_index  # (N,)
        safe = torch.where(valid, targets, 0)
        picked = torch.log_softmax(x, dim=-1).gather(1, safe[:, None]).squeeze(1)  # (N,)
        ctx.save_for_backward(x, safe, valid)
        ctx.logits_dtype = logits.dtype
        return -(picked * valid).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, safe, valid = ctx.saved_tensors
        g = torch.softmax(x, dim=-1)  # (N, V), a new tensor
        g.scatter_add_(1, safe[:, None], g.new_full((g.shape[0], 1), -1.0))
        g.mul_((grad * valid)[:, None])
        return g.to(ctx.logits_dtype), None, None


def lm_loss_sum(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
                ) -> tuple[Tensor, Tensor]:
    """Summed fp32 cross-entropy of logits (B, T, V) vs targets (B, T), and the target count."""
    if hasattr(logits, "placements"):  # vocabulary-sharded DTensor logits (loss_parallel)
        import torch.nn.functional as F

        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=ignore_index, reduction="sum")
        return loss.full_tensor(), (targets != ignore_index).sum()
    loss = _CrossEntropySum.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  ignore_index)
    return loss, (targets != ignore_index).sum()


def lm_loss(logits: Tensor, targets: Tensor, num_tokens: int | Tensor | None = None,
            ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy per real target token.

    With gradient accumulation pass num_tokens = the real targets of the whole global batch, so
    that the k micro-batch losses add up to exactly the loss of one big batch.
    """
    total, count = lm_loss_sum(logits, targets, ignore_index)
    denom = count if num_tokens is None else num_tokens
    return total / (denom.clamp(min=1) if isinstance(denom, Tensor) else max(denom, 1))
