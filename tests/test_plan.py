"""The memory planner against memory measured by torch's MemTracker on CPU (within 20%)."""

import pytest
import torch

from scratchllm.cli import main
from scratchllm.distributed.parallelize import checkpoint_blocks
from scratchllm.distributed.plan import Layout, plan_memory
from scratchllm.model import GPT, GPTConfig, lm_loss_sum


def measured_peak(config: GPTConfig, batch_size: int, ac: bool) -> float:
    """Peak bytes of params, grads, optimizer state and activations over a training step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = GPT(config)
    if ac:
        checkpoint_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1))

    def step():
        lm_loss_sum(model(x[:, :-1]), x[:, 1:])[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from the second step on, as in a run
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    return sum(v["Total"] for v in peak.values())


@pytest.mark.parametrize("shape, batch_size, ac", [
    (dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, context_length=64), 8, False),
    (dict(n_layer=4, n_head=4, n_embd=64, vocab_size=256, context_length=128), 8, True),
    (dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=96, vocab_size=1024, context_length=32,
          mlp="swiglu", norm="rmsnorm", pos_encoding="rope", bias=False), 4, False),
    (dict(n_layer=3, n_head=2, n_embd=256, vocab_size=128, context_length=16,
          resid_dropout=0.1), 2, False),  # parameters and optimizer state dominate
], ids=["gelu", "checkpointed", "llama-style", "param-bound"])
def test_plan_is_within_20_percent_of_measured_peak(shape, batch_size, ac):
    config = GPTConfig(**shape)
    plan = plan_memory(config, batch_size, Layout(activation_checkpointing=ac))
    measured = measured_peak(config, batch_size, ac)
    assert plan.total == pytest.approx(measured, rel=0.2), (plan, measured)


def test_sharding_divides_what_each_stage_shards():
    config = GPTConfig.preset("gpt2-small", vocab_size=50304)  # padded: divides over ranks
    single = plan_memory(config, 4, Layout())
    zero1 = plan_memory(config, 4, Layout("zero1", 8))
    zero3 = plan_memory(config, 4, Layout("fsdp", 8))
    assert zero1.optimizer == pytest.approx(single.optimizer / 8)
    assert zero1.grads == single.grads and zero3.grads == pytest.approx(single.grads / 8)
    assert zero3.total < zero1.total < single.total
    tp = plan_memory(config, 4, Layout("none", 1, 4, sequence_parallel=True,
                                       loss_parallel=True))
    assert tp.activations < single.activations / 2


def test_plan_command_prints_every_layout(capsys):
    assert main(["plan", "--model", "gpt2-medium", "--gpus", "8", "--gpu-memory", "80GB",
                 "--train.batch_size=8"]) == 0
    out = capsys.readouterr().out
    for name in ("ddpx8", "zero1x8", "zero2x8", "fsdpx8", "tp2", "tp8", "max batch"):
        assert name in out
    assert main(["plan", "--model", "gpt2-small", "--gpu-memory", "lots"]) == 1
