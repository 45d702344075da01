"""Data for the fine-tuning walkthrough: a base pretrained on several named corpora (the
offline-base preset), instruction data from hf: datasets and from files whose keys differ
(a field mapping; GSM8K for real), and bad instruction data -> one-line errors."""

import json
from pathlib import Path

import pytest
import torch

from scratchllm.cli import main
from scratchllm.config import load_config
from scratchllm.data.chat import render
from scratchllm.data.instructions import load_instructions, parse_fields
from scratchllm.errors import UserError
from scratchllm.model import GPT, GPTConfig
from scratchllm.tokenizer import Tokenizer
from scratchllm.train import PretrainConfig, pretrainer

REPO = Path(__file__).resolve().parent.parent
FIELDS = "instruction=question,output=answer"


@pytest.fixture(autouse=True)
def mirror(monkeypatch, data):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # hf: sources here are local directories


@pytest.fixture(scope="module")
def gsm8k(data) -> Path:
    return data / "instruct-extra" / "gsm8k-train.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory, shakespeare_small):
    """A tiny random GPT with a small byte-level BPE and a context long enough for GSM8K."""
    torch.manual_seed(0)
    tok = Tokenizer.train([shakespeare_small[:20_000]], vocab_size=300)
    path = tmp_path_factory.mktemp("base")
    GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=1024, n_layer=1, n_head=2,
                  n_embd=32)).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


# ---- pretraining on several corpora -------------------------------------------------------


def test_pretraining_reads_several_sources_as_one_corpus(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("Zażółć gęślą jaźń. " * 400, encoding="utf-8")
    cfg = load_config(None, [f"--data.source=the-verdict,{extra}", "--data.tokenizer=char",
                             "--model.context_length=32", "--model.n_layer=1",
                             "--model.n_head=2", "--model.n_embd=16", "--train.batch_size=2",
                             "--train.max_steps=1", "--eval.batches=1",
                             "--eval.sample_tokens=0", "--train.threads=1"], PretrainConfig)
    assert cfg.data.source == ["the-verdict", str(extra)]
    loop = pretrainer(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    loop.run()
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert [d["source"] for d in meta["sources"]] == ["the-verdict", str(extra)]
    tok = loop.recipe.tokenizer  # trained on both: the Polish letters are in its alphabet
    assert tok.decode(tok.encode("jaźń")) == "jaźń" and tok.decode(tok.encode("Wharton"))


def test_source_lists_from_toml_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    for value, expected in (('["shakespeare", "gutenberg"]', ["shakespeare", "gutenberg"]),
                            ('"gutenberg"', ["gutenberg"])):
        path.write_text(f"[data]\nsource = {value}\n")
        assert load_config(path, [], PretrainConfig).data.source == expected
    path.write_text("[data]\nsource = []\n")
    with pytest.raises(UserError, match="data.source is empty"):
        load_config(path, [], PretrainConfig)


def test_offline_base_preset():
    cfg = load_config(REPO / "configs" / "offline-base.toml", [], PretrainConfig)
    model = cfg.model_config(cfg.data.vocab_size)
    assert cfg.data.source == ["shakespeare", "gutenberg"]
    assert model.context_length >= 256 and model.pos_encoding == "rope"
    assert (model.n_layer, model.n_embd) == (6, 384)
    assert cfg.optim.schedule == "wsd" and cfg.train.dtype == "auto"
    makefile = (REPO / "Makefile").read_text()
    assert "configs/offline-base.toml" in makefile and "\nbase:" in makefile


# ---- instruction data: field mappings and hf: ----------------------------------------------


def test_gsm8k_with_a_field_mapping(gsm8k, gpt2_tok):
    records = load_instructions(str(gsm8k), FIELDS)
    assert len(records) == 7473 and records == load_instructions("gsm8k", FIELDS)
    first = records[0]
    assert first["instruction"].startswith("Natalia sold clips to 48 of her friends")
    assert first["output"].endswith("#### 72") and "question" not in first
    ids, mask = render("alpaca", first, gpt2_tok)
    text = gpt2_tok.decode(ids)
    assert "### Instruction:\nNatalia sold clips" in text
    assert gpt2_tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == \
        first["output"] + "<|endoftext|>"
    with pytest.raises(UserError, match="neither 'messages'.*it has 'question', 'answer'"):
        load_instructions(str(gsm8k))


def test_hf_instruction_dataset_from_a_local_directory(tmp_path):
    root = tmp_path / "qa"
    root.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        (root / f"{split}.jsonl").write_text("".join(
            json.dumps({"q": f"{split} question {i}", "a": f"answer {i}", "id": i}) + "\n"
            for i in range(n)))
    records = load_instructions(f"hf:{root}", {"instruction": "q", "output": "a"})
    assert [r["instruction"] for r in records] == [f"train question {i}" for i in range(6)]
    assert records[0] == {"instruction": "train question 0", "output": "answer 0", "id": 0}
    test = load_instructions(f"hf:{root}@test", "instruction=q,output=a")
    assert [r["output"] for r in test] == ["answer 0", "answer 1"]
    with pytest.raises(UserError, match="cannot open HF dataset"):
        load_instructions(f"hf:{tmp_path / 'nothing-here'}")


def test_finetune_instruct_with_fields_on_gsm8k(base, gsm8k, tmp_path, capsys):
    subset = tmp_path / "gsm8k-40.jsonl"
    subset.write_text("".join(gsm8k.read_text().splitlines(keepends=True)[:40]))
    run = tmp_path / "run"
    assert main(["finetune", "instruct", "--checkpoint", str(base), "--data", str(subset),
                 "--fields", FIELDS, "--out", str(run), "--instruct.epochs=0",
                 "--train.max_steps=2", "--train.batch_size=2", "--instruct.eval_prompts=1",
                 "--instruct.max_new_tokens=2", "--train.threads=1"]) == 0
    err = capsys.readouterr().err
    assert "34 train, 2 val, 4 test examples" in err
    saved = (run / "config.toml").read_text()
    assert 'fields = ["instruction=question", "output=answer"]' in saved


# ---- bad input: one line each --------------------------------------------------------------


def one_line_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("fields, message", [
    ("instruction=query,output=answer", "example 1 has no field 'query' (it has 'question'"),
    ("instruction", "cannot read field mapping 'instruction'"),
    ("prompt=question", "unknown field 'prompt'"),
])
def test_bad_field_mappings(base, gsm8k, tmp_path, capsys, fields, message):
    err = one_line_error(capsys, ["finetune", "instruct", "--checkpoint", base, "--data", gsm8k,
                                  "--fields", fields, "--out", tmp_path / "run"])
    assert message in err


def test_bad_examples_are_named(base, tmp_path, capsys):
    records = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(10)]
    records[6]["output"] = "  "
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(records))
    argv = ["finetune", "instruct", "--checkpoint", base, "--out", tmp_path / "run"]
    err = one_line_error(capsys, [*argv, "--data", path])
    assert "example 7: message 1 is an empty assistant response" in err
    records[6]["output"] = "long " * 1500  # longer than the context, like every other one
    path.write_text(json.dumps([{**r, "output": "long " * 1500} for r in records]))
    err = one_line_error(capsys, [*argv, "--data", path])
    assert "every training example" in err and "longer than the context (1024 tokens)" in err


def test_a_conversation_longer_than_the_context_at_inference(base, capsys):
    long = "word " * 1200  # over the 1024-token context
    err = one_line_error(capsys, ["chat", "--checkpoint", base, "--template", "alpaca",
                                  "--prompt", long, "--device", "cpu"])
    assert "the model reads at most 1024" in err
    err = one_line_error(capsys, ["generate", "--checkpoint", base, "--prompt", long,
                                  "--device", "cpu"])
    assert "the model reads at most 1024" in err


@pytest.mark.parametrize("template, message", [
    ('{"template": "chatml"}', "unknown template 'chatml'"),
    ("{not json", "template.json is not valid JSON"),
    ('{"template": 3}', 'it should hold {"template": NAME}'),
])
def test_unknown_or_broken_saved_template(base, tmp_path, capsys, template, message):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (checkpoint / name).write_bytes((base / name).read_bytes())
    (checkpoint / "template.json").write_text(template)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    err = one_line_error(capsys, ["evaluate", "--checkpoint", checkpoint, "--data", data,
                                  "--device", "cpu", "--out", tmp_path / "e.jsonl"])
    assert message in err


def test_parse_fields_forms():
    expected = {"instruction": "question", "output": "answer"}
    assert parse_fields(FIELDS) == parse_fields(FIELDS.split(",")) == expected
    assert parse_fields(expected) == expected and parse_fields("") == {}
