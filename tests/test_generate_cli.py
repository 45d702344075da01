"""`scratchllm generate` on a tiny saved checkpoint: streaming, JSON, prompt sources, errors."""

import argparse
import copy
import io
import json

import pytest
import torch

from scratchllm.checkpoint import load_for_inference
from scratchllm.cli.generate import register as add_generate_command
from scratchllm.errors import UserError
from scratchllm.generate import GenerationConfig, complete, generate
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
    with torch.no_grad():  # biases and norm weights off their init (0 and 1), so they count
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape))
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
    # Every option reaches the library: sample i is the library's with seed 5 + i.
    path, model, tok = checkpoint
    options = dict(max_new_tokens=30, top_k=10, top_p=0.95, min_p=0.01, repetition_penalty=1.2,
                   frequency_penalty=0.1, presence_penalty=0.1)
    assert texts == [complete(model, [tok.encode("the ")], GenerationConfig(**options, seed=5 + i),
                              tok)[0].text for i in range(2)]
    stop = texts[0][8:10]
    out = run_json(checkpoint, *common, "--seed", "5", "--stop", stop, "--stop", "\x00",
                   capsys=capsys)
    [sample] = out["samples"]
    assert sample["text"] == texts[0][:texts[0].index(stop)]
    assert sample["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def eot_checkpoint(checkpoint, tmp_path_factory):
    """The checkpoint's model with <|endoftext|> as likely as "u" everywhere (it gets u's
    embedding, and so, tied, u's output row), so that beams do end at it."""
    _, model, tok = checkpoint
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.tok_emb.weight[tok.eot_id] = model.tok_emb.weight[tok.encode("u")[0]]
    path = tmp_path_factory.mktemp("eot-ckpt")
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path, model, tok


@torch.no_grad()
def beam_score(model: GPT, prompt: list[int], ids: list[int], length_penalty: float) -> float:
    """Summed log-probability of ids after prompt under the model / len(ids) ** penalty."""
    logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1]  # predicts each of ids
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(logp[torch.arange(len(ids)), ids].sum()) / len(ids) ** length_penalty


def test_beam_search_and_end_of_text(eot_checkpoint, capsys):
    _, model, tok = eot_checkpoint
    prompt = tok.encode("fox")
    args = ("--prompt", "fox", "--max-new-tokens", "8", "--beams", "3", "--length-penalty", "0.5")
    out = run_json(eot_checkpoint, *args, capsys=capsys)
    assert out["options"]["stop_ids"] == [tok.eot_id]  # <|endoftext|> ends a sample
    [sample] = out["samples"]
    # It ended at <|endoftext|>: the stop token is not in the text, but counts in the score.
    assert sample["finish_reason"] == "stop" and "<|endoftext|>" not in sample["text"]
    ids = tok.encode(sample["text"])
    assert 0 < sample["new_tokens"] == len(ids) < 8
    assert sample["score"] == pytest.approx(beam_score(model, prompt, [*ids, tok.eot_id], 0.5),
                                            abs=1e-5)
    # The library's beam search with the same options finds the same.
    [lib] = complete(model, [prompt], GenerationConfig(
        max_new_tokens=8, num_beams=3, length_penalty=0.5, stop_ids=(tok.eot_id,)), tok)
    # (the same up to summation order: a product's fast path may differ between the two)
    assert lib.ids == ids and lib.score == pytest.approx(sample["score"], abs=1e-5)
    # With --ignore-eot it runs to the length limit (<|endoftext|> is then an ordinary token).
    out = run_json(eot_checkpoint, *args, "--ignore-eot", capsys=capsys)
    [sample] = out["samples"]
    assert out["options"]["stop_ids"] == [] and sample["finish_reason"] == "length"
    ids = tok.encode(sample["text"], allowed_special="all")
    assert sample["new_tokens"] == len(ids) == 8
    assert sample["score"] == pytest.approx(beam_score(model, prompt, ids, 0.5), abs=1e-5)


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


@pytest.mark.parametrize("dtype, native", [("bfloat16", True), ("bfloat16", False),
                                           ("float16", None)])
def test_low_precision_weights_generate_like_fp32(checkpoint, capsys, monkeypatch, dtype,
                                                  native):
    """bf16/fp16 weights (each CPU bf16 path forced) give fp32's greedy text and logits within
    the dtype's rounding; the CLI loads the weights in that dtype."""
    path, model, tok = checkpoint
    if native is not None:
        monkeypatch.setattr("scratchllm.model.fastpath.cpu_has_native_bf16", lambda: native)
    prompt = tok.encode("the qu")
    out = run_json(checkpoint, "--prompt", "the qu", "--max-new-tokens", "12", "--temperature",
                   "0", "--ignore-eot", "--dtype", dtype, capsys=capsys)
    low, _ = load_for_inference(path, "cpu", dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in low.parameters())
    ids = generate(low, prompt, max_new_tokens=12, temperature=0)
    assert out["samples"][0]["text"] == tok.decode(ids) and out["samples"][0]["new_tokens"] == 12
    # Against fp32: the same greedy tokens (at most a late near-tie may differ) ...
    ref = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert sum(a == b for a, b in zip(ids, ref, strict=True)) >= 10, (ids, ref)
    # ... and, on the same tokens, logits within the dtype's rounding of fp32's.
    x = torch.tensor([prompt + ref])
    with torch.no_grad():
        want, got = model(x), low(x)
    assert got.dtype == getattr(torch, dtype)
    tol = {"bfloat16": 2**-4, "float16": 2**-7}[dtype]  # 8 and 11 significant bits
    err = (got.float() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), (err, want.abs().max().item())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
