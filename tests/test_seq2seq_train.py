"""The seq2seq recipe on the shared loop: it learns to reverse strings (the Annotated
Transformer's smoke test) to 100% exact match, resumes exactly, and the `train-seq2seq` /
`translate` commands work end to end, summarization included, with one-line errors."""

import json
import random
from pathlib import Path

import pytest
import torch

from scratchllm.cli import main
from scratchllm.config import load_config
from scratchllm.data.parallel import read_tsv
from scratchllm.tokenizer import CharTokenizer
from scratchllm.train.seq2seq import Seq2SeqTrainConfig, load_seq2seq, seq2seq_trainer, translate

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghij"
TINY = ["--model.n_encoder_layer=2", "--model.n_decoder_layer=2", "--model.n_head=4",
        "--model.n_embd=64", "--model.mlp_hidden=128", "--model.embd_dropout=0.0",
        "--model.resid_dropout=0.0", "--train.threads=1", "--eval.every=0"]


@pytest.fixture(scope="module")
def reverse_data(tmp_path_factory):
    """12,000 random strings of 2-6 letters and their reverses (TSV), and a char tokenizer."""
    root = tmp_path_factory.mktemp("reverse")
    rng = random.Random(0)
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6)))
             for _ in range(12_000)]
    (root / "pairs.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    CharTokenizer.train([LETTERS]).save(root / "tokenizer.json")
    return root


def reverse_overrides(root, steps: int, extra=()) -> list[str]:
    return [f"--seq2seq.data={root / 'pairs.tsv'}",
            f"--seq2seq.tokenizer={root / 'tokenizer.json'}", "--seq2seq.test_size=200",
            "--seq2seq.val_size=100", "--seq2seq.max_source_len=8",
            "--seq2seq.max_target_len=8", "--seq2seq.max_tokens=1024",
            "--seq2seq.eval_sentences=100", "--seq2seq.max_length_ratio=1.0",
            "--seq2seq.max_length_extra=2", "--seq2seq.samples=0", *TINY,
            "--model.label_smoothing=0.0", f"--train.max_steps={steps}", "--optim.lr=3e-3",
            "--optim.schedule=cosine", "--optim.min_lr=1e-4", "--optim.warmup_steps=50",
            "--optim.weight_decay=0.0", "--checkpoint.every=100000", *extra]


def test_learns_to_reverse_strings_exactly(reverse_data, tmp_path, capsys):
    config = load_config(None, reverse_overrides(reverse_data, 400), Seq2SeqTrainConfig)
    result = seq2seq_trainer(config, tmp_path / "run", progress=False,
                             log=lambda *_: None).run()
    # 100 decoded val strings, all exact (one-word outputs have no BLEU 2- to 4-grams).
    assert result.last_eval["val_exact"] == 100.0 and result.last_eval["val_chrf"] == 100.0
    model, tokenizer = load_seq2seq(tmp_path / "run", device="cpu")
    test = read_tsv(tmp_path / "run" / "data" / "test.tsv")
    train_sources = {s for s, _ in read_tsv(tmp_path / "run" / "data" / "train.tsv")}
    assert len(test) == 200 and not train_sources & {s for s, _ in test}  # never seen
    sources = [s for s, _ in test]
    assert translate(model, tokenizer, sources, max_length_ratio=1.0) == [t for _, t in test]
    beams = translate(model, tokenizer, sources[:20], beams=3, max_length_ratio=1.0)
    assert beams == [t for _, t in test[:20]]
    # The command line: texts, and the held-out test split scored.
    assert main(["translate", "--checkpoint", str(tmp_path / "run"), "abcdef", "jihg",
                 "--beams", "2"]) == 0
    assert capsys.readouterr().out.split() == ["fedcba", "ghij"]
    assert main(["translate", "--checkpoint", str(tmp_path / "run"), "--score", "test",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pairs": 200, "beams": 1, "bleu": 0.0,
                                                   "chrf": 100.0, "exact": 100.0}


def test_resume_matches_an_uninterrupted_run(reverse_data, tmp_path):
    def run(out, steps, resume=None):
        config = load_config(None, reverse_overrides(
            reverse_data, steps, ["--model.n_embd=32", "--seq2seq.eval_sentences=0"]),
            Seq2SeqTrainConfig)
        seq2seq_trainer(config, out, resume=resume, progress=False, log=lambda *_: None).run()
        return load_seq2seq(out, device="cpu")[0].state_dict()

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "split", 3)
    resumed = run(tmp_path / "split", 6, resume="auto")
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, msg=key)


def test_train_translate_and_summarize_commands(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))
    small = ["--seq2seq.vocab_size=400", "--seq2seq.max_pairs=300", "--seq2seq.test_size=20",
             "--seq2seq.val_size=10", "--seq2seq.eval_sentences=4", "--seq2seq.samples=1",
             "--seq2seq.max_tokens=2048", "--model.n_embd=32", "--model.mlp_hidden=64",
             *TINY[:2], "--train.threads=1"]
    run = tmp_path / "fr-en"
    assert main(["train-seq2seq", "--out", str(run), "--data", "tatoeba-fra-eng",
                 "--source-lang", "fr", "--target-lang", "en", "--max-steps", "3", *small]) == 0
    out = capsys.readouterr().out
    assert "validation: loss" in out and "bleu" in out and "chrf" in out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"val_loss", "val_bleu", "val_chrf", "samples"} <= set(metrics[-1])
    assert (run / "data" / "test.tsv").read_text().count("\n") == 20
    assert main(["translate", "--checkpoint", str(run), "Bonjour."]) == 0
    # Summarization: the same machinery with ROUGE (a smoke test on Gutenberg paragraphs).
    summ = tmp_path / "summ"
    assert main(["train-seq2seq", "--out", str(summ), "--task", "summarize", "--max-steps",
                 "2", *small]) == 0
    out = capsys.readouterr().out
    assert "rouge1" in out and "rougeL" in out
    assert main(["summarize", "--checkpoint", str(summ), "--score", "test", "--limit", "3",
                 "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"rouge1", "rouge2", "rougeL"}


@pytest.mark.parametrize("argv, message", [
    (["train-seq2seq", "--data", "tatoeba-fra-eng", "--source-lang", "de", "--target-lang",
      "en"], "holds fr-en pairs, not de-en"),
    (["train-seq2seq", "--source-lang", "fr"], "set both"),
    (["train-seq2seq", "--model.norm_position=middle"], "norm_position"),
    (["train-seq2seq", "--parallel.data=fsdp"], "data-parallel only"),
    (["train-seq2seq", "--seq2seq.max_source_len=512", "--model.context_length=128"],
     "context_length"),
])
def test_bad_train_input_is_a_one_line_error(argv, message, tmp_path, data, monkeypatch,
                                             capsys):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))
    assert main([*argv, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_translate_refuses_a_gpt_checkpoint(tmp_path, capsys):
    from scratchllm.model import GPT, GPTConfig

    GPT(GPTConfig.preset("nano", vocab_size=300)).save_pretrained(tmp_path)
    assert main(["translate", "--checkpoint", str(tmp_path), "hello"]) == 1
    assert "not an encoder-decoder" in capsys.readouterr().err


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("seq2seq-*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_presets_load(path):
    import tomllib

    config = load_config(path, [], Seq2SeqTrainConfig)
    for section, values in tomllib.loads(path.read_text()).items():
        for key, value in values.items():  # every value in the file reached the config
            got = config.model[key] if section == "model" else \
                getattr(getattr(config, section), key)
            assert got == value, (section, key)
    model = config.model_config(config.seq2seq.vocab_size)
    assert model.context_length >= config.seq2seq.max_source_len


def test_splits_are_reused_only_with_the_same_settings(reverse_data, tmp_path):
    from scratchllm.train.seq2seq import load_splits

    task = load_config(None, reverse_overrides(reverse_data, 1), Seq2SeqTrainConfig).seq2seq
    first, fresh = load_splits(task, tmp_path, log=lambda *_: None)
    assert fresh and len(first["test"]) == 200
    again, fresh = load_splits(task, tmp_path, log=lambda *_: None)  # a resumed run
    assert not fresh and again == first
    task.test_size = 50  # another run in the same directory: split anew
    other, fresh = load_splits(task, tmp_path, log=lambda *_: None)
    assert fresh and len(other["test"]) == 50
