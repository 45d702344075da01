"""Direct Preference Optimization: response log-probabilities, the DPO loss and its metrics.

DPO (Rafailov et al., 2023) trains a policy against a frozen reference on (prompt, chosen,
rejected) pairs. With r = beta * (log pi(y|x) - log pi_ref(y|x)) the implicit reward, the loss
is -log sigmoid(r_chosen - r_rejected), averaged over pairs. This is TRL's "sigmoid" loss with
label smoothing 0 (the only form here: no conservative/robust variants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scratchllm.model import IGNORE_INDEX


def sequence_logprobs(logits: Tensor, targets: Tensor, average: bool = False) -> Tensor:
    """fp32 log-probability of each row's response tokens (B,): summed, or averaged if asked.

    targets (B, T) are the next tokens (already shifted, as for the LM loss) with prompt and
    padding positions set to IGNORE_INDEX. The sum is the paper's form; the mean over response
    tokens is the book's (it removes the length bias but changes what beta means).
    """
    x = logits.float()  # (B, T, V); log-probs in fp32 even for bf16 logits
    valid = targets != IGNORE_INDEX  # (B, T)
    safe = torch.where(valid, targets, 0)  # ignored positions read token 0, then are masked out
    # log p(target) = logit[target] - logsumexp(logits): no (B, T, V) log-softmax is kept
    picked = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)  # (B, T)
    total = (picked * valid).sum(dim=-1)  # (B,)
    if not average:
        return total
    return total / valid.sum(dim=-1).clamp(min=1)  # a row with no response tokens gives 0


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Mean DPO loss over pairs and the per-pair rewards (chosen (B,), rejected (B,)).

    Each input is (B,) sequence log-probabilities. The rewards beta * (policy - ref) are
    detached: they are for logging, the gradient flows through the loss only.
    """
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # (B,)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Reward margin, reward accuracy (share of pairs with chosen > rejected) and mean rewards."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
    }
