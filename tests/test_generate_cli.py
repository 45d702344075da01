"""`scratchllm generate` on a tiny saved checkpoint: streaming, JSON, prompt sources, errors."""

import argparse
import io
import json

import pytest
import torch

from scratchllm.checkpoint import load_for_inference
from scratchllm.cli.generate import register as add_generate_command
from scratchllm.errors import UserError
from scratchllm.generate import generate
from scratchllm.model import GPT, GPTConfig
from scratchllm.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog, héllo wörld ✓\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 1-layer model and a character tokenizer saved as a checkpoint directory."""
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2,
                          n_embd=16, init_std=0.5))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path, model.eval(), tok


def run(*argv: str) -> int | None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_generate_command(sub)
    args = parser.parse_args(["generate", *argv])
    return args.handler(args)


def run_json(checkpoint, *argv: str, capsys) -> dict:
    assert run("--checkpoint", str(checkpoint[0]), "--json", *argv) in (0, None)
    return json.loads(capsys.readouterr().out)


def test_greedy_json_matches_the_library(checkpoint, capsys):
    path, model, tok = checkpoint
    out = run_json(checkpoint, "--prompt", "the qu", "--max-new-tokens", "20",
                   "--temperature", "0", "--ignore-eot", capsys=capsys)
    ids = generate(model, tok.encode("the qu"), max_new_tokens=20, temperature=0)
    [sample] = out["samples"]
    assert sample["text"] == tok.decode(ids) and sample["new_tokens"] == 20
    assert sample["finish_reason"] == "length" and out["prompt_tokens"] == 6
    assert sample["time_to_first_token_s"] > 0 and sample["total_s"] >= sample[
        "time_to_first_token_s"]


def test_streaming_prints_prompt_and_text(checkpoint, capsys):
    expected = run_json(checkpoint, "--prompt", "héllo", "--max-new-tokens", "25", "--seed", "3",
                        "--ignore-eot", capsys=capsys)["samples"][0]["text"]
    run("--checkpoint", str(checkpoint[0]), "--prompt", "héllo", "--max-new-tokens", "25",
        "--seed", "3", "--ignore-eot")
    captured = capsys.readouterr()
    assert captured.out == "héllo" + expected + "\n"
    assert "25 tokens" in captured.err and "finish: length" in captured.err


def test_options_samples_and_stop_strings(checkpoint, capsys):
    common = ("--prompt", "the ", "--max-new-tokens", "30", "--ignore-eot", "--top-k", "10",
              "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.2",
              "--frequency-penalty", "0.1", "--presence-penalty", "0.1")
    out = run_json(checkpoint, *common, "--seed", "5", "--num-samples", "2", capsys=capsys)
    again = run_json(checkpoint, *common, "--seed", "5", "--num-samples", "2", capsys=capsys)
    texts = [s["text"] for s in out["samples"]]
    assert texts == [s["text"] for s in again["samples"]] and texts[0] != texts[1]
    stop = texts[0][8:10]
    out = run_json(checkpoint, *common, "--seed", "5", "--stop", stop, "--stop", "\x00",
                   capsys=capsys)
    [sample] = out["samples"]
    assert sample["text"] == texts[0][:texts[0].index(stop)]
    assert sample["finish_reason"] == "stop"


def test_beam_search_and_end_of_text(checkpoint, capsys):
    out = run_json(checkpoint, "--prompt", "fox", "--max-new-tokens", "8", "--beams", "3",
                   "--length-penalty", "0.5", capsys=capsys)
    assert out["samples"][0]["score"] <= 0 and out["options"]["num_beams"] == 3
    assert out["options"]["stop_ids"] == [checkpoint[2].eot_id]  # <|endoftext|> ends a sample


def test_prompt_from_file_and_stdin(checkpoint, capsys, tmp_path, monkeypatch):
    args = ("--max-new-tokens", "5", "--temperature", "0", "--ignore-eot")
    want = run_json(checkpoint, "--prompt", "lazy", *args, capsys=capsys)["samples"]
    (tmp_path / "p.txt").write_text("lazy", encoding="utf-8")
    assert run_json(checkpoint, "--prompt-file", str(tmp_path / "p.txt"), *args,
                    capsys=capsys)["samples"][0]["text"] == want[0]["text"]
    monkeypatch.setattr("sys.stdin", io.StringIO("lazy"))
    assert run_json(checkpoint, *args, capsys=capsys)["samples"][0]["text"] == want[0]["text"]


def test_long_prompts_and_bad_input(checkpoint, capsys, tmp_path):
    path = str(checkpoint[0])
    long = TEXT[:40]  # 40 characters, context 32
    with pytest.raises(UserError, match="--truncate-prompt"):
        run("--checkpoint", path, "--prompt", long)
    out = run_json(checkpoint, "--prompt", long, "--truncate-prompt", "--max-new-tokens", "40",
                   "--temperature", "0", "--ignore-eot", capsys=capsys)
    assert out["prompt_tokens"] == 32 and out["samples"][0]["new_tokens"] == 40  # slides
    out = run_json(checkpoint, "--prompt", long, "--truncate-prompt", "--max-new-tokens", "40",
                   "--temperature", "0", "--ignore-eot", "--context-policy", "stop",
                   capsys=capsys)
    assert out["samples"][0]["finish_reason"] == "context"
    for bad in (["--num-samples", "0"], ["--temperature", "-1"], ["--top-p", "2"],
                ["--beams", "2", "--num-samples", "2"], ["--max-new-tokens", "-3"]):
        with pytest.raises(UserError):
            run("--checkpoint", path, "--prompt", "a", *bad)
    with pytest.raises(UserError, match="checkpoint"):
        run("--checkpoint", str(tmp_path), "--prompt", "a")
    with pytest.raises(UserError, match="prompt-file"):
        run("--checkpoint", path, "--prompt-file", str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_weights_generate_like_the_library(checkpoint, capsys, dtype):
    path, model, tok = checkpoint
    out = run_json(checkpoint, "--prompt", "the qu", "--max-new-tokens", "12", "--temperature",
                   "0", "--ignore-eot", "--dtype", dtype, capsys=capsys)
    loaded, _ = load_for_inference(path, "cpu", dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in loaded.parameters())
    low = GPT.from_pretrained(path).to(getattr(torch, dtype)).eval()
    ids = generate(low, tok.encode("the qu"), max_new_tokens=12, temperature=0)
    assert out["samples"][0]["text"] == tok.decode(ids) and out["samples"][0]["new_tokens"] == 12
