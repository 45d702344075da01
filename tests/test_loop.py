"""The shared training loop with a hand-made recipe: accumulation, clipping, checkpoint
replacement under kills at every filesystem operation, corrupt state, torn metrics."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from scratchllm import checkpoint as ckpt
from scratchllm.config import load_config
from scratchllm.errors import UserError
from scratchllm.model import GPT, IGNORE_INDEX, GPTConfig, lm_loss_sum
from scratchllm.tokenizer import CharTokenizer
from scratchllm.train import PretrainConfig, Recipe, TrainLoop
from scratchllm.train.pretrain import next_token_loss

VOCAB, T = 40, 16


class FixedBatches:
    """Yields the given batches in turn (and says where it is, for resume)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def data(rows: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (rows, T), generator=g)
    y = torch.randint(0, VOCAB, (rows, T), generator=g)
    y[0, :9] = IGNORE_INDEX  # padding: must not skew the mean
    y[5, 3:] = IGNORE_INDEX
    return x, y


def config(*extra):
    return load_config(None, ["--train.max_steps=1", "--train.device=cpu", "--eval.every=0",
                              "--eval.sample_tokens=0", "--optim.warmup_steps=0",
                              "--optim.schedule=constant", "--train.threads=1", *extra],
                       PretrainConfig)


def make_loop(tmp_path, batches, accumulation=1, *extra, name="run"):
    def build(loop):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("nano", n_layer=1, vocab_size=VOCAB, context_length=T))
        tok = CharTokenizer.train(["abc"])
        return Recipe(model=model, batches=FixedBatches(batches), loss=next_token_loss,
                      tokenizer=tok, accumulation=accumulation)

    return TrainLoop(config(*extra), tmp_path / name, build, progress=False, log=lambda *_: None)


def capture_gradients(loop) -> list:
    """The gradients the optimizer steps with (filled in by the next train_step)."""
    grads, real_step = [], loop.optimizer.step

    def step(*args, **kwargs):
        grads.extend(p.grad.clone() for p in loop.model.parameters())
        return real_step(*args, **kwargs)

    loop.optimizer.step = step
    return grads


def test_accumulation_through_the_loop_equals_one_big_batch(tmp_path):
    x, y = data()
    big = make_loop(tmp_path, [(x, y)], 1, name="big")
    small = make_loop(tmp_path, [(x[:4], y[:4]), (x[4:], y[4:])], 2, name="small")
    results = []
    for loop in (big, small):
        loop.setup()
        grads = capture_gradients(loop)
        loss, grad_norm, tokens = loop.train_step()
        results.append((loss, grad_norm, tokens, grads))
    (l1, g1, n1, p1), (l2, g2, n2, p2) = results
    # The loss of one batch: the mean over its real targets, computed here from the definition.
    with torch.no_grad():
        torch.manual_seed(0)
        reference = GPT(GPTConfig.preset("nano", n_layer=1, vocab_size=VOCAB, context_length=T))
        total, count = lm_loss_sum(reference(x), y)
    assert l1 == pytest.approx(float(total / count), rel=1e-5)
    assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-4)
    assert n1 == n2 == x.numel()
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gradients_are_clipped_to_the_configured_norm(tmp_path):
    x, y = data()
    loop = make_loop(tmp_path, [(x, y)], 1, "--train.grad_clip=0.05")
    loop.setup()
    seen = {}
    real_step = loop.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in loop.model.parameters() if p.grad is not None]
        seen["norm"] = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))
        return real_step(*args, **kwargs)

    loop.optimizer.step = step
    _, reported, _ = loop.train_step()
    assert reported > 0.05  # the norm before clipping, as logged
    assert seen["norm"] == pytest.approx(0.05, rel=1e-4)  # what the optimizer stepped with


def save_tiny(run_dir, step):
    model = GPT(GPTConfig.preset("nano", n_layer=1, vocab_size=VOCAB, context_length=T))
    opt = torch.optim.AdamW(model.parameters())
    model(data()[0]).sum().backward()
    opt.step()
    return ckpt.save_checkpoint(run_dir, step, weights=model.state_dict(), config=model.config,
                                tokenizer=CharTokenizer.train(["abc"]),
                                optimizer_state=opt.state_dict(), state={"note": step})


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_kill_between_any_two_filesystem_operations_leaves_a_complete_checkpoint(
        tmp_path, monkeypatch):
    """Re-saving step 4 over a complete step 4, killed before each rename/delete/write."""
    operations = ("replace", "rename", "rmdir", "unlink", "mkdir", "fsync")
    n = 0
    while True:
        run = tmp_path / f"run{n}"
        save_tiny(run, 4)
        calls = {"count": 0}

        def killing(real, calls=calls, at=n + 1):
            def op(*args, **kwargs):
                calls["count"] += 1
                if calls["count"] == at:
                    raise Killed
                return real(*args, **kwargs)
            return op

        with monkeypatch.context() as m:
            for name in operations:
                m.setattr(os, name, killing(getattr(os, name)))
            m.setattr(shutil, "rmtree", killing(shutil.rmtree))
            try:
                save_tiny(run, 4)
                finished = True
            except Killed:
                finished = False
        ckpt.recover_checkpoints(run)  # what the next start does
        found = ckpt.list_checkpoints(run)
        assert [p.name for p in found] == ["step-000004"], (n, os.listdir(run / "checkpoints"))
        model, _ = ckpt.load_for_inference(found[0])  # complete and loadable
        state = json.loads((found[0] / "training.json").read_text())
        assert state["note"] == 4 and model.config.vocab_size == VOCAB
        assert sorted(os.listdir(run / "checkpoints")) == ["step-000004"]
        if finished:
            break
        n += 1
    assert n >= 5  # the kill landed between each of the save's filesystem operations


def test_corrupt_training_state_names_the_file_and_the_fallback(tmp_path):
    save_tiny(tmp_path, 2)
    newest = save_tiny(tmp_path, 4)
    (newest / "training.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    model = GPT(GPTConfig.preset("nano", n_layer=1, vocab_size=VOCAB, context_length=T))
    with pytest.raises(UserError) as e:
        ckpt.load_training_state(newest, torch.optim.AdamW(model.parameters()))
    message = str(e.value)
    assert "training.safetensors is damaged" in message and "\n" not in message
    assert "step-000002" in message


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    x, y = data()
    make_loop(tmp_path, [(x, y)], 1, "--train.max_steps=2", "--train.log_every=1").run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.2')  # power loss mid-line
    warnings = []
    loop = make_loop(tmp_path, [(x, y)], 1, "--train.max_steps=3", "--train.log_every=1")
    loop.resume, loop.log = "auto", warnings.append
    assert loop.run().step == 3
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("dropped 1 unreadable line" in w for w in warnings)



HEAP_OF_A_BIG_ACTIVATION = """
import ctypes, sys, torch
from scratchllm.runtime import reuse_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "reuse":
    reuse_freed_memory()
heap_before = mallinfo2().arena
x = torch.empty(12 << 20).fill_(1.0)  # 48 MiB, above glibc's largest adaptive threshold
mapped = mallinfo2().hblkhd >= 48 << 20  # in a mapping of its own, unmapped when freed
del x
kept = mallinfo2().arena - heap_before >= 48 << 20  # freed, still ours for the next step
print(mapped, kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_training_keeps_freed_activations_for_the_next_step():
    def heap(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", HEAP_OF_A_BIG_ACTIVATION, mode],
                              check=True, capture_output=True, text=True).stdout.split()

    # By default each step maps its big activations anew and the kernel zeroes every page
    # (~20,000 page faults per baby-GPT step); the loop calls reuse_freed_memory().
    assert heap("default") == ["True", "False"]
    assert heap("reuse") == ["False", "True"]
