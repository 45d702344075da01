"""DPO on the shared loop: log 2 at the start, growing reward margins, exact resume, errors."""

import json
import math

import pytest

from scratchllm.cli import main
from scratchllm.config import load_config
from scratchllm.finetune.preference import DPOConfig, dpo_trainer
from tests.conftest import pretrain_tiny_base


@pytest.fixture(autouse=True)
def mirror(monkeypatch, data):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))


@pytest.fixture(scope="module")
def policy(tmp_path_factory, data):
    """A tiny char-level base (context, layers, steps as this file needs)."""
    return pretrain_tiny_base(tmp_path_factory.mktemp("policy"), data, 256, 1, 2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Polite (chosen) vs rude (rejected) answers to short requests."""
    records = [{"instruction": f"pass the {w}", "input": "", "chosen": f"here is the {w}",
                "rejected": "get it yourself"} for w in ("salt", "book", "pen", "cup") * 10]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
                                                 .read_text().splitlines()) if "loss" in r]


def config(policy, pairs, *extra):
    return load_config(None, [f"--dpo.checkpoint={policy}", f"--dpo.data={pairs}",
                              "--train.batch_size=4", "--train.log_every=1",
                              "--train.threads=1", *extra], DPOConfig)


def test_dpo_starts_at_log2_and_learns_the_preference(policy, pairs, tmp_path):
    loop = dpo_trainer(config(policy, pairs, "--dpo.epochs=4", "--optim.lr=3e-3"), tmp_path,
                       progress=False, log=lambda *_: None)
    loop.run()
    assert losses(tmp_path)[0][1] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "val_reward_margin" in r]
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"] > 0
    assert evals[-1]["val_reward_accuracy"] == 1.0 and evals[-1]["val_loss"] < math.log(2)
    assert {"train_chosen_reward", "train_rejected_reward"} <= set(evals[-1])


@pytest.mark.parametrize("what", ["--lora.rank=0", "--lora.rank=2"])
def test_dpo_resumes_exactly(policy, pairs, tmp_path, what):
    args = ("--dpo.epochs=1", "--optim.lr=1e-3", what)
    dpo_trainer(config(policy, pairs, *args), tmp_path / "full", progress=False,
                log=lambda *_: None).run()
    stopped = dpo_trainer(config(policy, pairs, *args), tmp_path / "split", progress=False,
                          log=lambda *_: None)
    stopped.step_callbacks.append(lambda t, step: setattr(t, "stop_requested", step == 3))
    assert stopped.run().step == 3
    dpo_trainer(config(policy, pairs, *args), tmp_path / "split", resume="auto",
                progress=False, log=lambda *_: None).run()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_dpo_cli_and_bad_data(policy, pairs, tmp_path, capsys):
    assert main(["finetune", "dpo", "--checkpoint", str(policy), "--data", str(pairs),
                 "--out", str(tmp_path / "run"), "--train.batch_size=4",
                 "--train.threads=1"]) == 0
    assert "scratchllm chat --checkpoint" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x", "chosen": "a"}]')
    assert main(["finetune", "dpo", "--checkpoint", str(policy), "--data", str(bad),
                 "--out", str(tmp_path / "run2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing field(s) rejected" in err
    assert main(["finetune", "dpo", "--checkpoint", str(policy), "--out",
                 str(tmp_path / "run3"), "--dpo.beta=0"]) == 1
    assert "dpo.beta = 0" in capsys.readouterr().err
