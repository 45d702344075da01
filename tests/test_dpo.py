"""DPO: loss and rewards equal TRL's, response log-probs from the definition, preference data."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from scratchllm.data.formats import alpaca_text
from scratchllm.data.preference import (
    PreferencePair,
    load_preference,
    parse_pairs,
    read_pairs,
    split_pairs,
)
from scratchllm.errors import UserError
from scratchllm.finetune.dpo import dpo_loss, dpo_metrics, sequence_logprobs
from scratchllm.model import IGNORE_INDEX


def _trl_dpo(pc, pr, rc, rr, beta):
    """TRL's own DPOTrainer._compute_loss (sigmoid, reverse KL) on given sequence log-probs.

    TRL 1.x has no standalone loss function, so a stand-in trainer and model feed it: each
    completion is one token whose log-prob is the sequence log-prob, and the reference
    log-probs come in as precomputed. Returns the loss and TRL's logged metrics.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    logps = torch.cat([pc, pr])[:, None]  # (2B, 1): batch is [chosen, rejected]
    n = logps.shape[0]
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros(n, 1),
                              mean_logits=torch.zeros(n, 1),
                              is_top1=torch.zeros(n, 1, dtype=torch.bool))
    model = SimpleNamespace(training=False)
    identity = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t,
                               device=torch.device("cpu"))
    trainer = SimpleNamespace(
        model=model, accelerator=identity, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, 2, dtype=torch.long),
              "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * n),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _random_logps(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # sequence log-probs of tens of tokens: large negative values, close between policy and ref
    base = -torch.rand(2, batch, generator=g, dtype=torch.float64) * 80
    noise = torch.randn(2, batch, generator=g, dtype=torch.float64) * 5
    pc, pr = base[0] + noise[0], base[1] + noise[1]
    return [pc, pr, base[0], base[1]]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_loss_matches_trl(beta, seed):
    pc, pr, rc, rr = _random_logps(16, seed)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    trl_loss, trl_metrics = _trl_dpo(pc, pr, rc, rr, beta)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    ours = dpo_metrics(chosen, rejected)
    for mine, theirs in [("chosen_reward", "rewards/chosen"),
                         ("rejected_reward", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"),
                         ("reward_accuracy", "rewards/accuracies")]:
        assert abs(ours[mine] - trl_metrics[theirs]) < 1e-6, mine
    # per-pair rewards: TRL logs only batch means, so compare one pair at a time
    for i in range(3):
        one = [t[i:i + 1] for t in (pc, pr, rc, rr)]
        _, metrics = _trl_dpo(*one, beta)
        assert abs(chosen[i].item() - metrics["rewards/chosen"]) < 1e-6
        assert abs(rejected[i].item() - metrics["rewards/rejected"]) < 1e-6


def test_dpo_loss_fp32_matches_trl():
    pc, pr, rc, rr = (t.float() for t in _random_logps(8, 7))
    loss, _, _ = dpo_loss(pc, pr, rc, rr)
    assert abs(loss.item() - _trl_dpo(pc, pr, rc, rr, 0.1)[0].item()) < 1e-6


def test_dpo_loss_closed_form_and_gradient():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.0))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # margin 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.2)).item())
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    # equal policy and reference: loss log 2, no margin
    assert dpo_loss(rc, rr, rc, rr)[0].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())

    pc, pr = (torch.randn(4, requires_grad=True) for _ in range(2))
    rc, rr = torch.randn(4), torch.randn(4)
    loss, chosen, _ = dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise chosen, lower rejected
    assert not chosen.requires_grad
    with torch.no_grad():
        higher = dpo_loss(pc + 1.0, pr, rc, rr)[0]
        lower = dpo_loss(pc, pr + 1.0, rc, rr)[0]
    assert higher < loss < lower


def test_dpo_metrics():
    m = dpo_metrics(torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, -1.0]))
    assert m == pytest.approx({"reward_margin": 0.25, "reward_accuracy": 0.5,
                               "chosen_reward": 0.5, "rejected_reward": 0.25})


def _masked_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g) * 3  # (B, T, V)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :2] = IGNORE_INDEX  # prompt tokens
    targets[1, :4] = IGNORE_INDEX
    targets[1, 6:] = IGNORE_INDEX  # right padding
    targets[2, :] = IGNORE_INDEX  # no response tokens at all
    return logits, targets


def test_sequence_logprobs_from_definition():
    logits, targets = _masked_batch()
    expected_sum, expected_mean = [], []
    for b in range(3):
        terms = []
        for t in range(7):
            if targets[b, t] != IGNORE_INDEX:
                p = torch.softmax(logits[b, t].double(), dim=-1)[targets[b, t]]
                terms.append(torch.log(p).item())
        expected_sum.append(sum(terms))
        expected_mean.append(sum(terms) / len(terms) if terms else 0.0)
    summed = sequence_logprobs(logits, targets)
    averaged = sequence_logprobs(logits, targets, average=True)
    assert summed.shape == averaged.shape == (3,)
    assert summed.dtype == averaged.dtype == torch.float32
    torch.testing.assert_close(summed.double(), torch.tensor(expected_sum, dtype=torch.float64))
    torch.testing.assert_close(averaged.double(), torch.tensor(expected_mean, dtype=torch.float64))
    # bf16 logits still give fp32 log-probs; ignored positions never matter
    assert sequence_logprobs(logits.bfloat16(), targets).dtype == torch.float32
    changed = logits.clone()
    changed[1, :4] = 100.0
    changed[1, 6] = -100.0
    torch.testing.assert_close(sequence_logprobs(changed, targets), summed)


def test_sequence_logprobs_agrees_with_cross_entropy_and_grads():
    logits, targets = _masked_batch(1)
    logits.requires_grad_(True)
    summed = sequence_logprobs(logits, targets)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                                           ignore_index=IGNORE_INDEX).sum(dim=1)
    torch.testing.assert_close(summed, -ce)
    summed.sum().backward()
    assert logits.grad[targets == IGNORE_INDEX].abs().max() == 0  # no gradient from the prompt


# --- preference data -----------------------------------------------------------------------


def test_preference_data_loads_with_book_split(data):
    splits = load_preference()
    assert (len(splits.train), len(splits.test), len(splits.val)) == (935, 110, 55)
    records = json.loads((data / "preference-data" / "instruction-data-with-preference.json")
                         .read_text(encoding="utf-8"))
    assert len(records) == 1100
    # the book's split is in file order: train, then test, then val
    first, last_test = records[0], records[935 + 109]
    assert splits.train[0] == PreferencePair(
        alpaca_text(first["instruction"], first["input"], ""), first["chosen"], first["rejected"],
        first["instruction"], first["input"])
    assert splits.test[-1].chosen == last_test["chosen"]
    assert splits.val[-1].rejected == records[-1]["rejected"]
    assert splits.train[0].prompt + splits.train[0].chosen == alpaca_text(
        first["instruction"], first["input"], first["chosen"])
    assert splits.train[0].prompt.endswith("### Response:\n")
    assert load_preference() == splits  # deterministic
    assert splits.split("val") is splits.val
    with pytest.raises(UserError, match="unknown split"):
        splits.split("dev")


def test_preference_prompt_without_input(tmp_path):
    path = tmp_path / "p.json"
    records = [{"instruction": "Say hi.", "chosen": "Hello!", "rejected": "No."},
               {"instruction": "Add.", "input": "", "chosen": "2", "rejected": "3"}]
    path.write_text(json.dumps(records))
    pairs = read_pairs(path)
    assert "### Input" not in pairs[0].prompt and "### Input" not in pairs[1].prompt
    assert pairs[0].prompt == alpaca_text("Say hi.", "", "")
    splits = load_preference(path)  # a .json path instead of the name
    assert (splits.train, splits.test, splits.val) == (pairs[:1], [], pairs[1:])


def test_split_sizes_small():
    pairs = [PreferencePair(str(i), "a", "b") for i in range(20)]
    splits = split_pairs(pairs)
    assert [p.prompt for p in splits.train] == [str(i) for i in range(17)]
    assert [p.prompt for p in splits.test] == ["17", "18"]
    assert [p.prompt for p in splits.val] == ["19"]


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "x", "chosen": "a"}], "entry 0 is missing field"),
    ([{"instruction": "x", "chosen": "a", "rejected": "b"},
      {"chosen": "a", "rejected": "b"}], "entry 1 is missing field"),
    ([{"instruction": "x", "chosen": " ", "rejected": "b"}], "entry 0 has empty chosen"),
    ([{"instruction": "x", "chosen": ["a"], "rejected": "b"}], "must be text"),
    (["not an object"], "entry 0 is not an object"),
    ({"instruction": "x"}, "expected a non-empty JSON array"),
    ([], "expected a non-empty JSON array"),
])
def test_preference_errors(records, message):
    with pytest.raises(UserError, match=message) as e:
        parse_pairs(records, "p.json")
    assert "\n" not in str(e.value)


def test_preference_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_pairs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_pairs(bad)
    with pytest.raises(UserError, match="unknown preference data"):
        load_preference("polite-data")
