"""`scratchllm convert`: HF model directories in and out, tokenizers with HF's ids, bad input."""

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from scratchllm.checkpoint import load_for_inference
from scratchllm.cli import main
from scratchllm.errors import UserError
from scratchllm.tokenizer import Tokenizer
from scratchllm.tokenizer.hf import hf_tokenizer_from_dict, load_hf_tokenizer, load_hf_vocab_merges
from tests.test_model_hf import _perturb, hf_llama, load_hf

TOL = 1e-5  # fp32, same weights: the logits must agree to rounding
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TRICKY = ["Hello world", " it's  we'LL  don't\n\n\n  x", "naïve café — 東京 🤖🤖 \u200b\t\r\n",
          "1234567 + 89 = ?", "<|endoftext|>two docs<|endoftext|>", "   ", "a\n\nb  \n c",
          "def f(x):\n    return x**2  # 😀\n"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def soup(tok: Tokenizer, n: int, seed: int) -> list[str]:
    """Texts made of random vocabulary tokens back to back: pairs natural text rarely shows."""
    rng, tokens = random.Random(seed), list(tok.vocab)
    texts = []
    for _ in range(n):
        rng.shuffle(tokens)
        texts.append(b"".join(tokens[:2000]).decode("utf-8", errors="ignore"))
    return texts


# ---- tokenizers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_hf_tokenizer_dir(gpt2_files, tmp_path_factory) -> Path:
    """GPT-2's tokenizer as transformers saves it (tokenizer.json + tokenizer_config.json)."""
    src = tmp_path_factory.mktemp("gpt2-src")
    shutil.copy(gpt2_files[0], src / "vocab.json")  # OpenAI's files are HF's, renamed
    shutil.copy(gpt2_files[1], src / "merges.txt")
    GPT2Config().save_pretrained(src)
    out = tmp_path_factory.mktemp("gpt2-hf-tokenizer")
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, out / name)
    return out


def test_gpt2_tokenizer_json_gives_hf_ids(gpt2_hf_tokenizer_dir, gpt2_tok, data):
    ours = load_hf_tokenizer(gpt2_hf_tokenizer_dir / "tokenizer.json")
    assert ours.fingerprint() == gpt2_tok.fingerprint()  # the very tokenizer of encoder.json
    files = load_hf_vocab_merges(gpt2_hf_tokenizer_dir / "vocab.json",
                                 gpt2_hf_tokenizer_dir / "merges.txt")
    assert files.fingerprint() == gpt2_tok.fingerprint()
    hf = HFTokenizer.from_file(str(gpt2_hf_tokenizer_dir / "tokenizer.json"))
    verdict = (data / "the-verdict" / "the-verdict.txt").read_text(encoding="utf-8")
    sms = (data / "sms-spam" / "SMSSpamCollection").read_text(encoding="utf-8")[:200_000]
    texts = [*TRICKY, verdict, sms, *soup(ours, 10, seed=0)]
    for text in texts:  # HF matches added tokens in any text: ours when they are allowed
        assert ours.encode(text, allowed_special="all") == hf.encode(text).ids, text[:80]
    assert ours.decode(hf.encode(verdict).ids) == verdict


def test_gpt2_tokenizer_json_of_the_hub_layout(gpt2_hf_tokenizer_dir, gpt2_tok, tmp_path):
    # The file in the hub's gpt2 repo is older: merges as "a b" strings, no model type, no
    # use_regex, and <|endoftext|> in the vocab as well as in added_tokens.
    data = json.loads((gpt2_hf_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    del model["type"], model["ignore_merges"], data["pre_tokenizer"]["use_regex"]
    model["merges"] = [" ".join(m) for m in model["merges"]]
    model["vocab"]["<|endoftext|>"] = 50256
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert load_hf_tokenizer(tmp_path / "tokenizer.json").fingerprint() == gpt2_tok.fingerprint()
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(TRICKY[1]).ids == gpt2_tok.encode(TRICKY[1])


def llama3_style_tokenizer_json(text: str) -> dict:
    """A tiktoken-style tokenizer.json as Llama 3 ships it: Split(regex) + ByteLevel, merges in
    id order, ignore_merges, special tokens after the ordinary ones, a BOS post-processor."""
    tok = Tokenizer.train([text], vocab_size=600, pattern=LLAMA3_PATTERN,
                          special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    data = tok.to_hf_dict()
    bos = tok.special_tokens["<|begin_of_text|>"]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                 "tokens": ["<|begin_of_text|>"]}}}
    return data


def test_llama3_style_tokenizer_json_gives_hf_ids(tmp_path, shakespeare_small):
    data = llama3_style_tokenizer_json(shakespeare_small[:100_000])
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    ours = load_hf_tokenizer(tmp_path / "tokenizer.json")
    assert ours.pattern == LLAMA3_PATTERN and "<|end_of_text|>" in ours.special_tokens
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*TRICKY, shakespeare_small[100_000:160_000], *soup(ours, 10, seed=1)]:
        assert ours.encode(text, allowed_special="all") == \
            hf.encode(text, add_special_tokens=False).ids, text[:80]


def test_hf_trained_byte_level_bpe_gives_hf_ids(shakespeare_small):
    from tokenizers import decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([shakespeare_small[:200_000]], trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.add_special_tokens(["<|endoftext|>"])  # after training: its id follows the others
    ours = hf_tokenizer_from_dict(json.loads(hf.to_str()))
    for text in [*TRICKY, shakespeare_small[200_000:260_000], *soup(ours, 10, seed=2)]:
        assert ours.encode(text, allowed_special="all") == hf.encode(text).ids, text[:80]


def _edit(data: dict, path: str, value) -> dict:
    data = json.loads(json.dumps(data))
    *keys, last = path.split(".")
    target = data
    for key in keys:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("normalizer", {"type": "NFC"}, "normalizes text first"),
    ("pre_tokenizer.pretokenizers.1.add_prefix_space", True, "adds a prefix space"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}, "pre-tokenizer .Metaspace."),
    ("pre_tokenizer.pretokenizers.1.use_regex", True, "pre-tokenizer"),
    ("model.byte_fallback", True, "byte_fallback"),
    ("model.type", "WordPiece", "not a BPE"),
    ("model.continuing_subword_prefix", "##", "continuing_subword_prefix"),
    ("decoder", {"type": "Metaspace"}, "decoder is Metaspace"),
    ("added_tokens.0.lstrip", True, "lstrip"),
    ("added_tokens.0.id", 0, "added token"),
    ("model.merges", [["x", "y"], ["t", "h"]], "makes no token|not in the vocab"),
])
def test_tokenizers_we_cannot_reproduce_are_refused(tmp_path, shakespeare_small, path, value,
                                                    message):
    data = llama3_style_tokenizer_json(shakespeare_small[:20_000])
    (tmp_path / "tokenizer.json").write_text(json.dumps(_edit(data, path, value)))
    with pytest.raises(UserError, match=message) as info:
        load_hf_tokenizer(tmp_path / "tokenizer.json")
    assert "cannot be converted exactly" in str(info.value) and "\n" not in str(info.value)


def test_merges_out_of_id_order_are_refused(shakespeare_small):
    data = llama3_style_tokenizer_json(shakespeare_small[:20_000])
    merges = data["model"]["merges"]
    merges[5], merges[40] = merges[40], merges[5]  # HF's priority != tiktoken's rank order
    with pytest.raises(UserError, match="not in id order"):
        hf_tokenizer_from_dict(data)


# ---- models: the CLI both ways -------------------------------------------------------------


def hf_gpt2_real_vocab() -> GPT2LMHeadModel:
    """A tiny random GPT-2 with GPT-2's real vocabulary size, so its tokenizer fits."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(cfg).eval()
    _perturb(model, 1)
    return model


def assert_logits_equal(ours, hf, ids: list[int]) -> None:
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff


def round_trip(capsys, tmp_path: Path, hf_dir: Path, hf, text: str, *extra) -> None:
    """from-hf then to-hf through the CLI: same ids as HF's tokenizer, same logits each way."""
    ckpt, back = tmp_path / "runs" / "ckpt", tmp_path / "hf-back"
    code, out, err = run(capsys, "convert", "--from-hf", hf_dir, "--out", ckpt, *extra)
    assert code == 0, err
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors",
                                                      "tokenizer.json"]
    model, tok = load_for_inference(ckpt)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.encode(text, allowed_special="all")
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert_logits_equal(model, hf, ids)

    code, out, err = run(capsys, "generate", "--checkpoint", ckpt, "--prompt", text,
                         "--max-new-tokens", "4", "--temperature", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["new_tokens"] >= 1

    code, out, err = run(capsys, "convert", "--to-hf", "--checkpoint", ckpt, "--out", back)
    assert code == 0, err
    again = load_hf(back)
    assert type(again) is type(hf)
    assert_logits_equal(model, again, ids)
    back_tok = AutoTokenizer.from_pretrained(back)
    assert back_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert back_tok.decode(ids) == text


def test_gpt2_both_ways_through_the_cli(tmp_path, capsys, gpt2_hf_tokenizer_dir):
    hf = hf_gpt2_real_vocab()
    hf_dir = tmp_path / "gpt2"
    hf.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gpt2_hf_tokenizer_dir / name, hf_dir / name)
    round_trip(capsys, tmp_path, hf_dir, hf, "Every effort moves you, said Gisburn. 🤖")
    cfg = json.loads((tmp_path / "hf-back" / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 50256


def test_gpt2_from_vocab_and_merges_files_and_sharded(tmp_path, capsys, gpt2_hf_tokenizer_dir,
                                                      gpt2_tok):
    hf = hf_gpt2_real_vocab()
    hf_dir = tmp_path / "gpt2"
    hf.save_pretrained(hf_dir, max_shard_size="1MB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_hf_tokenizer_dir / name, hf_dir / name)
    code, _, err = run(capsys, "convert", "--from-hf", hf_dir, "--out", tmp_path / "ckpt")
    assert code == 0, err
    model, tok = load_for_inference(tmp_path / "ckpt")
    assert tok.fingerprint() == gpt2_tok.fingerprint()
    assert_logits_equal(model, hf, gpt2_tok.encode("The sharded one"))


def test_llama_both_ways_through_the_cli(tmp_path, capsys, shakespeare_small):
    data = llama3_style_tokenizer_json(shakespeare_small[:100_000])
    vocab = len(data["model"]["vocab"]) + len(data["added_tokens"])
    hf = hf_llama_sized(vocab)
    hf_dir = tmp_path / "llama"
    hf.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>"}))
    round_trip(capsys, tmp_path, hf_dir, hf, "To be, or not to be: that is the question.\n")
    cfg = json.loads((tmp_path / "hf-back" / "config.json").read_text())
    ids = data["added_tokens"]
    assert cfg["bos_token_id"] == next(t["id"] for t in ids if t["content"] == "<|begin_of_text|>")
    assert cfg["eos_token_id"] == next(t["id"] for t in ids if t["content"] == "<|endoftext|>")


def hf_llama_sized(vocab_size: int):
    model = hf_llama()
    model.resize_token_embeddings(vocab_size)
    _perturb(model, 3)
    return model.eval()


def test_tokenizer_option_and_bfloat16(tmp_path, capsys, gpt2_tok):
    hf = hf_gpt2_real_vocab()
    hf.save_pretrained(tmp_path / "gpt2")  # no tokenizer files
    gpt2_tok.save(tmp_path / "tok.json")
    code, _, err = run(capsys, "convert", "--from-hf", tmp_path / "gpt2", "--out",
                       tmp_path / "ckpt", "--tokenizer", tmp_path / "tok.json", "--dtype",
                       "bfloat16")
    assert code == 0, err
    model, tok = load_for_inference(tmp_path / "ckpt", dtype="bfloat16")
    assert tok.fingerprint() == gpt2_tok.fingerprint()
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(model.tok_emb.weight, hf.transformer.wte.weight.to(torch.bfloat16))


# ---- refusals and bad input ----------------------------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that a loader ran code from the pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def assert_one_line_error(capsys, argv, message: str, tmp_path: Path) -> None:
    before = set(tmp_path.rglob("*"))
    capsys.readouterr()  # drop what setting up printed (transformers' progress bars)
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert set(tmp_path.rglob("*")) == before  # nothing written, no temp directory left


def test_pickle_checkpoints_are_refused_unread(tmp_path, capsys):
    hf_dir = tmp_path / "legacy"
    hf_dir.mkdir()
    hf_gpt2_real_vocab().config.to_json_file(hf_dir / "config.json")
    trap = tmp_path / "unpickled"
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Trap(trap)}))
    assert_one_line_error(capsys, ["convert", "--from-hf", hf_dir, "--out", tmp_path / "out"],
                          "safe_serialization=True", tmp_path)
    assert not trap.exists()


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys,
                                                          gpt2_hf_tokenizer_dir):
    good = tmp_path / "good"
    hf_gpt2_real_vocab().save_pretrained(good)
    shutil.copy(gpt2_hf_tokenizer_dir / "tokenizer.json", good / "tokenizer.json")
    out = tmp_path / "out"

    def bad(name: str, edit) -> Path:
        path = tmp_path / name
        shutil.copytree(good, path)
        edit(path)
        return path

    cases = {
        "is not a directory": tmp_path / "missing",
        "config.json not found": bad("noconfig", lambda p: (p / "config.json").unlink()),
        "'bert' is not supported": bad("bert", lambda p: (p / "config.json").write_text(
            '{"model_type": "bert"}')),
        "not a readable safetensors file": bad("corrupt", lambda p: (
            p / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")),
        "no tokenizer in": bad("notok", lambda p: (p / "tokenizer.json").unlink()),
        "is not valid JSON": bad("badtok", lambda p: (p / "tokenizer.json").write_text("{")),
        "no model.safetensors": bad("noweights", lambda p: (p / "model.safetensors").unlink()),
    }
    for message, path in cases.items():
        assert_one_line_error(capsys, ["convert", "--from-hf", path, "--out", out], message,
                              tmp_path)
    # A truncated file, and weights that do not fit the config, fail the same way.
    shard = bad("truncated", lambda p: None) / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert_one_line_error(capsys, ["convert", "--from-hf", shard.parent, "--out", out],
                          "not a readable safetensors file", tmp_path)
    wrong = bad("wrong", lambda p: None)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    assert_one_line_error(capsys, ["convert", "--from-hf", wrong, "--out", out],
                          "config.json belongs", tmp_path)
    # --out taken, and the options of the other direction.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert_one_line_error(capsys, ["convert", "--from-hf", good, "--out", tmp_path / "taken"],
                          "--overwrite", tmp_path)
    assert_one_line_error(capsys, ["convert", "--to-hf", "--out", out], "needs --checkpoint",
                          tmp_path)
    assert_one_line_error(capsys, ["convert", "--to-hf", "--checkpoint", tmp_path / "missing",
                                   "--out", out], "neither a checkpoint", tmp_path)


def test_overwrite_replaces_the_whole_directory(tmp_path, capsys, gpt2_hf_tokenizer_dir):
    good = tmp_path / "good"
    hf_gpt2_real_vocab().save_pretrained(good)
    shutil.copy(gpt2_hf_tokenizer_dir / "tokenizer.json", good / "tokenizer.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run(capsys, "convert", "--from-hf", good, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "out"]  # no temp dirs left
