"""Distributed training on CPU (gloo, torchrun): every layout trains exactly like one process.

Each layout runs the same tiny model on the same global batch (sequential windows, so an
N-rank step reads exactly the windows a 1-rank step reads) and must give the same losses and
final weights (fp32, relative difference <= 1e-5); sharded checkpoints resume under another
layout and load into one process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchllm.checkpoint import find_checkpoint, load_for_inference, load_weights

CONFIG = """
[data]
source = "the-verdict"
tokenizer = "bpe"
vocab_size = 320
loader = "sequential"
[model]
preset = "nano"
context_length = 32
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 32
pos_encoding = "rope"
norm = "rmsnorm"
mlp = "swiglu"
bias = false
[train]
batch_size = 4
batch_tokens = 512
max_steps = 10
log_every = 1
threads = 1
[eval]
every = 5
batches = 1
sample_tokens = 4
[optim]
warmup_steps = 2
[checkpoint]
every = 5
keep_last = 3
"""


def scratchllm(*args: str, procs: int = 1) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={procs}", "-m", "scratchllm"] if procs > 1
                else [sys.executable, "-m", "scratchllm"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    a, b = (load_weights(find_checkpoint(r)) for r in (run, reference))
    assert b.keys() <= a.keys()  # a sharded checkpoint also lists the tied lm_head.weight
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data):
    """The config, the prepared shards and the single-process reference run."""
    root = tmp_path_factory.mktemp("dist")
    config = root / "tiny.toml"
    config.write_text(CONFIG)
    os.environ["SCRATCHLLM_DATA_DIR"] = str(data)
    scratchllm("pretrain", "--config", str(config), "--out", str(root / "single"))
    return root, config


def run(setup, name: str, *overrides: str, procs: int = 2) -> Path:
    root, config = setup
    out = root / name
    scratchllm("pretrain", "--config", str(config), "--out", str(out),
               f"--data.shards={root / 'single' / 'data'}", *overrides, procs=procs)
    return out


LAYOUTS = {
    "ddp": ["--parallel.data=ddp"],
    "zero1": ["--parallel.data=zero1"],
    "fsdp": ["--parallel.data=fsdp"],
    "zero2": ["--parallel.data=fsdp", "--parallel.reshard_after_forward=false"],
    "tp": ["--parallel.tensor=2"],
    "tp-sp-lossparallel": ["--parallel.tensor=2", "--parallel.sequence_parallel=true",
                           "--parallel.loss_parallel=true"],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_trains_like_one_process(setup, name):
    assert_same_run(run(setup, name, *LAYOUTS[name]), setup[0] / "single")


def test_two_dimensional_mesh_tensor_by_fsdp(setup):
    out = run(setup, "2d", "--parallel.tensor=2", "--parallel.data=fsdp", procs=4)
    assert_same_run(out, setup[0] / "single")


def test_accumulation_with_ddp_equals_one_big_batch(setup):
    big = run(setup, "big-batch", "--train.batch_size=16", procs=1)  # one micro-batch of 512
    ddp = setup[0] / "ddp"
    if not ddp.exists():
        ddp = run(setup, "ddp", *LAYOUTS["ddp"])
    assert_same_run(ddp, big)


def test_sharded_checkpoint_resumes_on_another_layout_and_loads_in_one_process(setup):
    root, reference = setup[0], setup[0] / "single"
    sharded = root / "tp"
    if not sharded.exists():
        sharded = run(setup, "tp", "--parallel.tensor=2")
    last = find_checkpoint(sharded)
    assert (last / "sharded").is_dir() and not (last / "model.safetensors").exists()
    # Loaded in one process (generate, convert): the same logits as the reference model.
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        logits = [load_for_inference(r)[0](x) for r in (sharded, reference)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    # Interrupted after step 5: resume on 1 process and under FSDP, same losses as uninterrupted.
    for name, overrides, procs in (("resume-1", [], 1),
                                   ("resume-fsdp", ["--parallel.data=fsdp"], 2)):
        out = root / name
        shutil.copytree(sharded, out)
        shutil.rmtree(out / "checkpoints" / "step-000010")
        scratchllm("pretrain", "--config", str(setup[1]), "--out", str(out), "--resume",
                   f"--data.shards={root / 'single' / 'data'}", *overrides, procs=procs)
        assert_same_run(out, reference)


def test_fine_tuning_under_ddp_trains_like_one_process(setup):
    """The fine-tuning commands take the same [parallel] section: 2 ranks x batch 4 = 1 x 8."""
    root = setup[0]
    runs = {}
    for name, batch, procs in (("spam-1", 8, 1), ("spam-ddp", 4, 2)):
        runs[name] = root / name
        scratchllm("finetune", "classify", "--checkpoint", str(root / "single"), "--data",
                   "sms-spam", "--out", str(runs[name]), f"--train.batch_size={batch}",
                   "--classify.epochs=0", "--train.max_steps=4", "--train.log_every=1",
                   "--eval.every=4", "--eval.batches=1", "--train.threads=1",
                   "--parallel.data=ddp", procs=procs)
    got, want = losses(runs["spam-ddp"]), losses(runs["spam-1"])
    assert len(want) == 4
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)


def test_seq2seq_under_ddp_trains_like_one_process(setup, tmp_path):
    """train-seq2seq takes [parallel] too: 2 ranks x 1 batch of tokens = 1 rank x 2 of them."""
    root = setup[0]
    pairs = tmp_path / "pairs.tsv"
    words = [f"{a}{b}{c}" for a in "abcdef" for b in "ghijk" for c in "lmnop"]  # 150
    pairs.write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    runs = {}
    for name, procs in (("s2s-1", 1), ("s2s-ddp", 2)):
        runs[name] = root / name
        scratchllm("train-seq2seq", "--out", str(runs[name]), f"--seq2seq.data={pairs}",
                   "--seq2seq.vocab_size=300", "--seq2seq.val_size=10", "--seq2seq.test_size=10",
                   "--seq2seq.max_tokens=64", "--train.batch_tokens=128",
                   "--seq2seq.eval_sentences=0", "--seq2seq.samples=0",
                   "--model.n_encoder_layer=1", "--model.n_decoder_layer=1",
                   "--model.n_head=2", "--model.n_embd=32", "--model.mlp_hidden=64",
                   "--model.embd_dropout=0.0", "--model.resid_dropout=0.0",
                   "--train.max_steps=4", "--train.log_every=1", "--eval.every=4",
                   "--train.threads=1", "--parallel.data=ddp", procs=procs)
    got, want = losses(runs["s2s-ddp"]), losses(runs["s2s-1"])
    assert len(want) == 4
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
