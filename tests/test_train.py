"""The trainer: schedules, decay groups, accumulation, exact resume, crashes, signals, NaN."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scratchllm.checkpoint import list_checkpoints, load_for_inference
from scratchllm.config import load_config
from scratchllm.distributed.parallelize import checkpoint_blocks
from scratchllm.errors import UserError
from scratchllm.model import GPT, GPTConfig, lm_loss_sum
from scratchllm.train import PretrainConfig, pretrainer
from scratchllm.train import pretrain as pretrain_module
from scratchllm.train.config import OptimConfig
from scratchllm.train.optim import lr_at, param_groups

TINY = [
    "--data.source=the-verdict", "--data.tokenizer=char", "--model.context_length=32",
    "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.resid_dropout=0.1",
    "--train.batch_size=4", "--train.log_every=1", "--eval.every=3", "--eval.batches=2",
    "--eval.sample_tokens=0", "--optim.warmup_steps=2", "--checkpoint.every=4",
    "--train.threads=1",
]


@pytest.fixture(autouse=True)
def mirror(monkeypatch, data):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))


def tiny_config(*extra: str):
    return load_config(None, [*TINY, *extra], PretrainConfig)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def quiet(*_):
    pass


# --- pieces ---------------------------------------------------------------------------------
def test_schedules():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # cosine half way
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(35, cfg, 110) == pytest.approx(
        0.775)
    cfg.schedule = "constant"
    assert lr_at(100, cfg, 110) == 1.0
    cfg.schedule, cfg.decay_fraction = "wsd", 0.2
    assert lr_at(87, cfg, 110) == 1.0 and lr_at(99, cfg, 110) == pytest.approx(0.55)
    cfg.schedule = "nope"
    with pytest.raises(UserError, match="unknown optim.schedule"):
        lr_at(50, cfg, 110)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig.preset("nano", n_layer=1, tie_embeddings=False, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n and "emb" not in n
                           for n in decayed)
    assert "lm_head.weight" in decayed
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "tok_emb.weight" in kept and any(n.endswith("bias") for n in kept)
    assert no_decay["weight_decay"] == 0.0


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("nano", n_layer=1, vocab_size=50, context_length=16))
    x = torch.randint(0, 50, (8, 16))
    y = torch.randint(0, 50, (8, 16))
    y[0, :5] = -100  # padding must not skew the mean

    def grads(chunks):
        model.zero_grad()
        n = sum(int((yy != -100).sum()) for _, yy in chunks)
        for xx, yy in chunks:
            (lm_loss_sum(model(xx), yy)[0] / n).backward()
        return [p.grad.clone() for p in model.parameters()]

    big = grads([(x, y)])
    small = grads([(x[:4], y[:4]), (x[4:], y[4:])])
    for a, b in zip(big, small, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("nano", n_layer=2, vocab_size=40, context_length=16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 40, (4, 16))
    first = None
    for _ in range(60):
        loss = lm_loss_sum(model(x[:, :-1]), x[:, 1:])[0] / x[:, 1:].numel()
        first = first or float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first


def test_activation_checkpointing_keeps_names_and_gradients():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("nano", n_layer=2, vocab_size=40, context_length=16)
    plain, wrapped = GPT(cfg), GPT(cfg)
    wrapped.load_state_dict(plain.state_dict())
    checkpoint_blocks(wrapped)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x = torch.randint(0, 40, (2, 16))
    for m in (plain, wrapped):
        (lm_loss_sum(m(x[:, :-1]), x[:, 1:])[0]).backward()
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# --- runs -----------------------------------------------------------------------------------
def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
    pretrainer(tiny_config("--train.max_steps=8"), tmp_path / "full", log=quiet,
            progress=False).run()
    stopped = pretrainer(tiny_config("--train.max_steps=8"), tmp_path / "split", log=quiet,
                      progress=False)
    stopped.step_callbacks.append(lambda t, step: setattr(t, "stop_requested", step == 5))
    result = stopped.run()
    assert result.interrupted and result.step == 5
    assert [p.name for p in list_checkpoints(tmp_path / "split")][-1] == "step-000005"
    resumed = pretrainer(tiny_config("--train.max_steps=8"), tmp_path / "split", resume="auto",
                      log=quiet, progress=False).run()
    assert resumed.step == 8 and not resumed.interrupted
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bit for bit
    assert len(losses(tmp_path / "full")) == 8


def test_existing_run_needs_resume(tmp_path):
    pretrainer(tiny_config("--train.max_steps=2"), tmp_path, log=quiet, progress=False).run()
    with pytest.raises(UserError, match="pass --resume"):
        pretrainer(tiny_config("--train.max_steps=4"), tmp_path, log=quiet, progress=False).run()


def test_checkpoint_is_self_contained(tmp_path):
    pretrainer(tiny_config("--train.max_steps=4"), tmp_path, log=quiet, progress=False).run()
    model, tok = load_for_inference(tmp_path)
    assert tok.kind == "char" and model.config.n_layer == 2
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "config.toml").is_file()
    assert "max_steps = 4" in (tmp_path / "config.toml").read_text()


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        total, count = lm_loss_sum(logits, targets)
        return (total * math.nan if calls["n"] == 6 else total), count

    monkeypatch.setattr(pretrain_module, "lm_loss_sum", poisoned)
    with pytest.raises(UserError, match="loss became nan at step 6.*step-000004"):
        pretrainer(tiny_config("--train.max_steps=8", "--eval.every=0"), tmp_path / "a",
                log=quiet, progress=False).run()
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-000004"]

    calls["n"] = 0
    warnings = []
    result = pretrainer(tiny_config("--train.max_steps=8", "--eval.every=0",
                                 "--train.nan_policy=skip"), tmp_path / "b",
                     log=warnings.append, progress=False).run()
    assert result.step == 8 and any("skipped" in w for w in warnings)


SIGKILL_SCRIPT = """
import os, signal, sys
from scratchllm import checkpoint
from scratchllm.config import load_config
from scratchllm.train import PretrainConfig, pretrainer
real = checkpoint.atomic_write_bytes
def dying(path, data):
    real(path, data[: len(data) // 2])  # half a file, then the power goes out
    if "step-000008" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
checkpoint.atomic_write_bytes = dying
pretrainer(load_config(None, sys.argv[2:], PretrainConfig), sys.argv[1], progress=False).run()
"""


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    args = [*TINY, "--train.max_steps=10"]
    proc = subprocess.run([sys.executable, "-c", SIGKILL_SCRIPT, str(tmp_path / "run"), *args],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": "."})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # step 6 was saved as the best by val loss; step 8 died half-written
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step-000006"
    config = load_config(None, args, PretrainConfig)
    result = pretrainer(config, tmp_path / "run", resume="auto", log=quiet,
                        progress=False).run()
    assert result.step == 10
    assert not list((tmp_path / "run" / "checkpoints").glob(".partial-*"))
    pretrainer(load_config(None, args, PretrainConfig), tmp_path / "full", log=quiet,
               progress=False).run()
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_says_how_to_resume(tmp_path, signum):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "scratchllm", "pretrain", "--out", str(run),
           "--max-steps", "100000", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with: scratchllm pretrain" in err and "--resume" in err
    last = list_checkpoints(run)[-1]
    assert int(last.name.split("-")[1]) == losses(run)[-1][0]


def test_config_errors_are_one_line(tmp_path, capsys):
    from scratchllm.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_step = 5\n")
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'max_steps'" in err
    bad.write_bytes(b"\xd5\x00 binary")
    assert main(["plan", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a TOML config file" in err
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--model.n_embd=30",
                 "--model.n_head=4", "--train.max_steps=1", *TINY[:2]]) == 1
    assert "divisible" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--train.dtype=float8"]) == 1
    capsys.readouterr()
    damaged = tmp_path / "hf"  # an init_from directory whose config.json was cut off
    damaged.mkdir()
    (damaged / "config.json").write_text('{"model_type": "gp')
    assert main(["pretrain", "--out", str(tmp_path / "r"), *TINY,
                 f"--train.init_from={damaged}"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "config.json is not valid JSON" in errors[0]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_every_preset_config_loads(tmp_path):
    import tomllib
    from pathlib import Path

    from scratchllm.finetune.classify import ClassifyConfig

    paths = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.toml"))
    assert len(paths) >= 6
    for path in paths:
        raw = tomllib.loads(path.read_text())
        if "seq2seq" in raw:
            continue  # encoder-decoder presets: tests/test_seq2seq_train.py loads them
        schema = ClassifyConfig if "classify" in raw else PretrainConfig
        config = load_config(path, [], schema)
        for section, values in raw.items():  # every value in the file reached the config
            for key, value in values.items():
                got = config.model[key] if section == "model" else \
                    getattr(getattr(config, section), key)
                if isinstance(got, list) and isinstance(value, str):
                    value = [value]  # data.source: one name or a list
                assert got == value, (path.name, section, key)
        if schema is ClassifyConfig:
            continue
        vocab = 65 if config.data.tokenizer == "char" else config.data.vocab_size
        with torch.device("meta"):
            model = GPT(config.model_config(vocab))
        for key, value in raw.get("model", {}).items():
            if key != "preset":
                assert getattr(model.config, key) == value, (path.name, key)
        assert model.config.vocab_size == vocab and model.num_params() > 0


def test_continued_pretraining_from_an_hf_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    first = pretrainer(tiny_config("--train.max_steps=1"), tmp_path / "a", log=quiet,
                    progress=False)
    first.run()
    vocab = first.recipe.tokenizer.vocab_size
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2,
                                    n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    cont = pretrainer(tiny_config("--train.max_steps=1", "--optim.lr=0", "--optim.min_lr=0",
                               f"--train.init_from={tmp_path / 'hf'}",
                               f"--data.tokenizer={tmp_path / 'a' / 'tokenizer.json'}"),
                   tmp_path / "b", log=quiet, progress=False)
    cont.run()
    saved = load_file(tmp_path / "b" / "checkpoints" / "step-000001" / "model.safetensors")
    torch.testing.assert_close(saved["blocks.0.attn.q_proj.weight"],
                               hf.transformer.h[0].attn.c_attn.weight[:, :32].T)


def test_pretrain_then_generate_through_the_cli(tmp_path, capsys):
    from scratchllm.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--max-steps", "6", "--save-every", "3",
                 *TINY, "--eval.sample_tokens=10"]) == 0
    out = capsys.readouterr().out
    assert "--- sample at step 6 ---" in out and "scratchllm generate --checkpoint" in out
    assert main(["generate", "--checkpoint", str(run), "--prompt", "I had",
                 "--max-new-tokens", "12", "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "I had" and 1 <= result["samples"][0]["new_tokens"] <= 12
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").is_file()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    from scratchllm.cli import main

    pretrainer(tiny_config("--train.max_steps=2"), tmp_path, log=quiet, progress=False).run()
    weights = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["pretrain", "--out", str(tmp_path), "--resume", *TINY,
                 "--train.max_steps=4"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors is damaged" in err and f"delete {weights.parent} and" in err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "I"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


# --- validation before any work (reliability) -------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("--checkpoint.keep_last=0", "checkpoint.keep_last = 0 is out of range"),
    ("--checkpoint.keep_last=-2", "checkpoint.keep_last = -2 is out of range"),
    ("--checkpoint.every=0", "checkpoint.every = 0 is out of range"),
    ("--train.log_every=0", "train.log_every = 0 is out of range"),
    ("--train.nan_policy=skp", "did you mean 'skip'"),
    ("--train.dtype=bfloat", "did you mean 'bfloat16'"),
    ("--optim.schedule=cosin", "did you mean 'cosine'"),
    ("--data.loader=sequental", "did you mean 'sequential'"),
    ("--eval.prompt= --eval.sample_tokens=5", "eval.prompt is empty"),
    ("--optim.beta2=1.5", "optim.beta2 = 1.5 is out of range"),
    ("--train.device=gpu", "train.device = 'gpu'"),
])
def test_bad_config_values_fail_at_load_in_one_line(tmp_path, capsys, override, message):
    from scratchllm.cli import main

    overrides = override.split()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(*overrides)
    assert main(["pretrain", "--out", str(tmp_path / "r"), *TINY, *overrides]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "r").exists()  # nothing prepared, nothing written


@pytest.mark.parametrize("override, message", [
    ("--model.context_length=4000", "the val split of"),
    ("--eval.sample_tokens=5", "eval.prompt is 40 tokens, longer than the context (32)"),
])
def test_misconfigured_eval_fails_before_step_one(tmp_path, override, message):
    extra = ["--eval.prompt=" + "x" * 40] if "prompt" in message else []
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pretrainer(tiny_config(override, *extra), tmp_path, log=quiet, progress=False).run()
    assert not (tmp_path / "metrics.jsonl").exists() or not losses(tmp_path)
    assert list_checkpoints(tmp_path) == []


def test_a_failing_final_evaluation_keeps_the_finished_run(tmp_path, monkeypatch):
    real = pretrain_module.Evaluation.__call__

    def failing(self, loop):
        if loop.step == 4:
            raise RuntimeError("evaluation broke")
        return real(self, loop)

    monkeypatch.setattr(pretrain_module.Evaluation, "__call__", failing)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        pretrainer(tiny_config("--train.max_steps=4", "--checkpoint.every=100"), tmp_path,
                   log=quiet, progress=False).run()
    assert list_checkpoints(tmp_path)[-1].name == "step-000004"


def test_each_step_is_written_once(tmp_path, monkeypatch):
    from scratchllm import checkpoint

    saved = []
    real = checkpoint.save_checkpoint

    def counting(run_dir, step, **kwargs):
        saved.append(step)
        return real(run_dir, step, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", counting)
    pretrainer(tiny_config("--train.max_steps=12", "--eval.every=2", "--checkpoint.every=4"),
               tmp_path, log=quiet, progress=False).run()
    assert len(saved) == len(set(saved)) and {4, 8, 12} <= set(saved)


def test_keep_last_and_keep_best_prune_exactly(tmp_path):
    pretrainer(tiny_config("--train.max_steps=12", "--eval.every=2", "--checkpoint.every=2",
                           "--checkpoint.keep_last=2", "--optim.lr=3e-2"),
               tmp_path, log=quiet, progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
    best = min(vals)[1]
    kept = {int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path)}
    assert kept == {10, 12, best}


def test_val_perplexity_and_bits_per_byte_by_hand(tmp_path):
    import numpy as np
    import torch.nn.functional as F

    from scratchllm.data.loader import RandomWindows, load_tokens

    pretrainer(tiny_config("--train.max_steps=2", "--eval.batches=3"), tmp_path, log=quiet,
               progress=False).run()
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in line][-1]
    model, tok = load_for_inference(list_checkpoints(tmp_path)[-1])
    windows = RandomWindows(load_tokens(tmp_path / "data", "val", tok), 4, 32, seed=0)
    nats, count, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for _ in range(3):
            x, y = windows.next_batch()
            nats += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
            n_bytes += sum(len(tok.decode([int(i)]).encode("utf-8")) for i in y.flatten())
    assert record["val_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert record["val_ppl"] == pytest.approx(np.exp(nats / count), rel=1e-5)
    assert record["val_bpb"] == pytest.approx(nats / np.log(2) / n_bytes, rel=1e-5)


def test_sequential_loader_resumes_exactly(tmp_path):
    args = ("--train.max_steps=6", "--data.loader=sequential")
    pretrainer(tiny_config(*args), tmp_path / "full", log=quiet, progress=False).run()
    stopped = pretrainer(tiny_config(*args), tmp_path / "split", log=quiet, progress=False)
    stopped.step_callbacks.append(lambda t, step: setattr(t, "stop_requested", step == 3))
    assert stopped.run().step == 3
    pretrainer(tiny_config(*args), tmp_path / "split", resume="auto", log=quiet,
               progress=False).run()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert type(stopped.recipe.batches).__name__ == "SequentialWindows"


def test_bf16_training_through_the_trainer(tmp_path, monkeypatch):
    seen = []
    real = pretrain_module.lm_loss_sum

    def spy(logits, targets):
        seen.append(logits.dtype)
        return real(logits, targets)

    monkeypatch.setattr(pretrain_module, "lm_loss_sum", spy)
    result = pretrainer(tiny_config("--train.max_steps=6", "--train.dtype=bfloat16",
                                    "--optim.lr=1e-2"), tmp_path / "bf16", log=quiet,
                        progress=False).run()
    assert seen and seen[0] == torch.bfloat16  # the forward ran under bf16 autocast
    monkeypatch.setattr(pretrain_module, "lm_loss_sum", real)
    pretrainer(tiny_config("--train.max_steps=6", "--optim.lr=1e-2"), tmp_path / "fp32",
               log=quiet, progress=False).run()
    low, full = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert low != full and all(math.isfinite(v) for _, v in low)
    for (_, a), (_, b) in zip(low, full, strict=True):
        assert a == pytest.approx(b, rel=0.05)  # the same run up to bf16 rounding
    assert result.step == 6


def test_tensorboard_gets_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrainer(tiny_config("--train.max_steps=3"), tmp_path, log=quiet, progress=False).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([v for _, v in losses(tmp_path)], rel=1e-6)
    assert "val_loss" in events.Tags()["scalars"]


def test_generate_on_a_missing_device_says_so(tmp_path, capsys):
    from scratchllm.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pretrainer(tiny_config("--train.max_steps=1"), tmp_path, log=quiet, progress=False).run()
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "I",
                 "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "re-save" not in err


def test_an_explicit_tokenizer_wins_over_the_shards_own(tmp_path):
    from scratchllm.cli import main

    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--char", "--data", "the-verdict", "--out", str(tok)]) == 0
    shards = tmp_path / "shards"
    assert main(["prepare", "--data", "the-verdict", "--tokenizer", str(tok), "--out",
                 str(shards)]) == 0
    moved = tmp_path / "moved"
    shards.rename(moved)
    (moved / "tokenizer.json").unlink()  # the shard dir's own copy is gone, and so is
    tok = tok.rename(tmp_path / "elsewhere.json")  # the file it was made from
    result = pretrainer(tiny_config("--train.max_steps=1", f"--data.shards={moved}",
                                    f"--data.tokenizer={tok}"), tmp_path / "run", log=quiet,
                        progress=False).run()
    assert result.step == 1
