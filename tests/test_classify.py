"""Classification fine-tuning: data splits, pooling, what trains, the CLI, LoRA runs."""

import json

import pytest
import torch

from scratchllm.checkpoint import list_checkpoints
from scratchllm.cli import main
from scratchllm.config import load_config
from scratchllm.data.classification import load_classification, pad_batch
from scratchllm.errors import UserError
from scratchllm.finetune.classify import ClassifyConfig, classifier_trainer, load_classifier
from scratchllm.model import GPT, GPTConfig
from scratchllm.model.classifier import GPTClassifier
from tests.conftest import pretrain_tiny_base


@pytest.fixture(autouse=True)
def mirror(monkeypatch, data):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    """A tiny char-level base (context, layers, steps as this file needs)."""
    return pretrain_tiny_base(tmp_path_factory.mktemp("base"), data, 64, 2, 3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A separable toy set: texts about the sea vs texts about the hills."""
    words = {"sea": ["wave", "salt", "tide", "shore", "boat"],
             "hills": ["rock", "grass", "peak", "sheep", "moss"]}
    rows = []
    for i in range(60):
        for label, pool in words.items():
            text = " ".join(pool[(i + k) % 5] for k in range(2 + i % 4))
            rows.append({"text": text, "label": label})
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sms_spam_split_is_balanced_and_deterministic():
    a = load_classification("sms-spam")
    b = load_classification("sms-spam")
    assert (len(a.train), len(a.val), len(a.test)) == (1045, 149, 300)  # the book's sizes
    assert a.train == b.train and a.test == b.test
    everything = a.train + a.val + a.test
    assert sum(label == "spam" for _, label in everything) == 747 == len(everything) // 2
    assert a.labels == ["ham", "spam"]
    assert load_classification("sms-spam", seed=1).train != a.train


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_reads_the_real_tokens_of_mixed_lengths(pooling):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("nano", n_layer=2, vocab_size=50, context_length=16))
    model = GPTClassifier.from_gpt(gpt, ["a", "b", "c"], pooling).eval()
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ids, _, lengths = pad_batch(rows, [0, 1, 2], pad_id=49)
    with torch.no_grad():
        batched = model(ids, lengths)
        for i, row in enumerate(rows):  # each alone, without padding
            alone = model(torch.tensor([row]))
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
        h = model.hidden(torch.tensor([rows[1]]))[0]  # from the definition
        pooled = h[-1] if pooling == "last" else h.mean(0)
        torch.testing.assert_close(batched[1], model.head(pooled), atol=1e-5, rtol=1e-5)


def config(base, data, *extra):
    return load_config(None, [f"--classify.checkpoint={base}", f"--classify.data={data}",
                              "--classify.epochs=2", "--train.batch_size=8",
                              "--train.threads=1", "--optim.lr=3e-3", *extra], ClassifyConfig)


def test_frozen_parameters_do_not_change(base, toy, tmp_path):
    loop = classifier_trainer(config(base, toy, "--classify.trainable=last:1"), tmp_path,
                              progress=False, log=lambda *_: None)
    loop.setup()
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    loop.train_step()
    after = loop.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("blocks.1.", "norm_f.", "head.")) for k in changed)
    assert {"head.weight", "blocks.1.mlp.up_proj.weight"} <= changed
    assert not any(p.requires_grad for p in loop.model.blocks[0].parameters())


def test_finetune_and_classify_through_the_cli(base, toy, tmp_path, capsys):
    run = tmp_path / "clf"
    assert main(["finetune", "classify", "--checkpoint", str(base), "--data", str(toy),
                 "--out", str(run), "--classify.trainable=all", "--classify.epochs=4",
                 "--optim.lr=3e-3", "--train.threads=1"]) == 0
    out = capsys.readouterr().out
    assert "test confusion matrix" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "test_acc" in r][-1]
    assert final["test_acc"] >= 0.8 and final["epoch"] == 4.0  # chance is 0.5
    assert {"train_f1", "val_acc", "test_confusion"} <= set(final)
    assert main(["classify", "--checkpoint", str(run), "--json", "salt wave tide boat",
                 "grass peak sheep moss"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in results] == ["sea", "hills"]
    assert all(0.5 < r["probability"] <= 1 for r in results)


@pytest.mark.parametrize("what", ["--classify.trainable=all", "--lora.rank=4"])
def test_classification_resumes_exactly(base, toy, tmp_path, what):
    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
                                                     .read_text().splitlines()) if "loss" in r]

    args = ["--train.log_every=1", what, "--classify.dropout=0.1"]
    classifier_trainer(config(base, toy, *args), tmp_path / "full", progress=False,
                       log=lambda *_: None).run()
    stopped = classifier_trainer(config(base, toy, *args), tmp_path / "split", progress=False,
                                 log=lambda *_: None)
    stopped.step_callbacks.append(lambda t, step: setattr(t, "stop_requested", step == 13))
    assert stopped.run().step == 13  # mid-way through the second epoch
    classifier_trainer(config(base, toy, *args), tmp_path / "split", resume="auto",
                       progress=False, log=lambda *_: None).run()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "", "only one label"),
    ("", "", "holds no records"),
    ('{"body": "a", "label": "x"}\n', "", "no field 'text'"),
    ('{"text": "a", "label": "x"}\n', "--label-field=kind", "no field 'kind'"),
])
def test_bad_data_is_a_one_line_error(base, tmp_path, capsys, content, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    argv = ["finetune", "classify", "--checkpoint", str(base), "--data", str(path), "--out",
            str(tmp_path / "run")]
    if field:
        argv.append(field.replace("=", " ").split()[0])
        argv.append(field.split("=")[1])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not list_checkpoints(tmp_path / "run")


def test_classify_needs_a_classifier(base, tmp_path, capsys):
    assert main(["classify", "--checkpoint", str(base), "text"]) == 1
    assert "is not a classifier" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a classifier"):
        load_classifier(base)
    assert main(["merge", "--checkpoint", str(base), "--out", str(tmp_path / "m")]) == 1
    assert "has no LoRA adapters: merge takes a LoRA fine-tuning run" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_damaged_classifier_config_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"kind": "classif')  # cut off mid-write
    assert main(["classify", "--checkpoint", str(tmp_path), "text"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json is not valid JSON" in err


@pytest.mark.parametrize("content, message", [
    (None, "not found"), (b"\xd5\x00\xff binary", "codec can't decode")])
def test_unreadable_texts_file_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "texts.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["classify", "--checkpoint", str(tmp_path), "--file", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "give --file a UTF-8 text file" in err


def test_lora_run_saves_adapters_only_and_merges(base, toy, tmp_path, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    assert main(["finetune", "classify", "--checkpoint", str(base), "--data", str(toy),
                 "--out", str(run), "--lora.rank=4", "--lora.alpha=8", "--classify.epochs=3",
                 "--optim.lr=1e-2", "--train.threads=1"]) == 0
    err = capsys.readouterr().err
    assert "trainable:" in err
    newest = list_checkpoints(run)[-1]
    saved = load_file(newest / "model.safetensors")
    assert saved and all("lora_" in k or k.startswith("head.") for k in saved)
    full = load_file(list_checkpoints(base)[-1] / "model.safetensors")
    assert sum(t.numel() for t in saved.values()) < 0.2 * sum(t.numel() for t in full.values())
    config = json.loads((newest / "config.json").read_text())
    assert config["lora"]["rank"] == 4 and len(config["base_sha256"]) == 64

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(run), "--out", str(merged)]) == 0
    with_adapters, tok, _ = load_classifier(run)
    plain, _, plain_config = load_classifier(merged)
    assert "lora" not in plain_config.extra
    assert not any("lora_" in k for k in plain.state_dict())
    ids = torch.tensor([tok.encode("salt wave tide"), tok.encode("rock moss peak")])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), with_adapters(ids), atol=1e-5, rtol=0)


def test_lora_run_refuses_a_changed_base(base, toy, tmp_path):
    import shutil

    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    run = tmp_path / "lora"
    classifier_trainer(config(own_base, toy, "--lora.rank=2", "--classify.epochs=1"), run,
                       progress=False, log=lambda *_: None).run()
    weights = list_checkpoints(own_base)[-1] / "model.safetensors"
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(weights)
    state["norm_f.weight"] = state["norm_f.weight"] + 1
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(state, weights)
    with pytest.raises(UserError, match="changed since this LoRA run"):
        load_classifier(run)


def test_lora_targets_from_toml_and_the_command_line(tmp_path):
    cfg = load_config(None, ["--lora.targets=*.attn.q_proj, *.attn.v_proj"], ClassifyConfig)
    assert cfg.lora.targets == ["*.attn.q_proj", "*.attn.v_proj"]
    path = tmp_path / "c.toml"
    path.write_text('[lora]\nrank = 2\ntargets = ["*.mlp.*_proj"]\n')
    assert load_config(path, [], ClassifyConfig).lora.targets == ["*.mlp.*_proj"]
    path.write_text("[lora]\ntargets = 3\n")
    with pytest.raises(UserError, match="lora.targets must be a list of strings"):
        load_config(path, [], ClassifyConfig)
