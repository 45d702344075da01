"""Instruction tuning on the shared loop: masks in real batches, templates kept with the model,
vocabulary growth, LoRA runs, exact resume, errors."""

import json

import pytest
import torch

from scratchllm.checkpoint import list_checkpoints
from scratchllm.cli import main
from scratchllm.config import load_config
from scratchllm.data.chat import render_prompt
from scratchllm.data.instructions import load_instructions, split_book
from scratchllm.finetune.instruct import InstructConfig, instruct_trainer, load_chat_model
from scratchllm.model import IGNORE_INDEX
from tests.conftest import pretrain_tiny_base


@pytest.fixture(autouse=True)
def mirror(monkeypatch, data):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    """A tiny char-level base (context, layers, steps as this file needs)."""
    return pretrain_tiny_base(tmp_path_factory.mktemp("base"), data, 512, 1, 2)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """40 short Alpaca records and 40 two-turn conversations (chars the-verdict knows)."""
    records = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"}
               for w in ("yes", "no", "maybe", "soon") * 10]
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(records))
    chats = [{"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": f"hi {i}"},
                           {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "and?"},
                           {"role": "assistant", "content": f"bye {i}"}]} for i in range(40)]
    chat_path = path.parent / "chats.jsonl"
    chat_path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return path, chat_path


def config(base, data, *extra):
    return load_config(None, [f"--instruct.checkpoint={base}", f"--instruct.data={data}",
                              "--instruct.epochs=1", "--train.batch_size=4",
                              "--train.threads=1", "--optim.lr=1e-3", "--instruct.eval_prompts=1",
                              "--instruct.max_new_tokens=4", *extra], InstructConfig)


def test_book_split_and_data():
    records = load_instructions("instruction-data")
    splits = split_book(records)
    assert [len(splits[s]) for s in ("train", "test", "val")] == [935, 110, 55]  # the book's
    assert splits["train"][0] == records[0] and splits["val"][-1] == records[-1]


def test_batches_learn_only_the_responses(base, small_data, tmp_path):
    loop = instruct_trainer(config(base, small_data[1], "--instruct.template=chat"), tmp_path,
                            progress=False, log=lambda *_: None)
    loop.setup()
    tok = loop.recipe.tokenizer
    _, y = loop.recipe.batches.next_batch()
    for row_y in y.tolist():
        learned = [t for t in row_y if t != IGNORE_INDEX]
        # exactly the two assistant replies (a newline, the text, <|end|>) are learned
        text = tok.decode(learned)
        assert text.startswith("\nhello<|end|>\nbye ") and text.endswith("<|end|>")
        assert text.count("<|end|>") == 2 and "hi" not in text and "brief" not in text


def test_chat_template_grows_the_vocabulary_and_is_kept(base, small_data, tmp_path, capsys):
    run = tmp_path / "sft"
    assert main(["finetune", "instruct", "--checkpoint", str(base), "--data",
                 str(small_data[1]), "--template", "chat", "--out", str(run),
                 "--instruct.epochs=1", "--train.batch_size=4", "--train.threads=1"]) == 0
    assert "added 4 special tokens" in capsys.readouterr().err
    newest = list_checkpoints(run)[-1]
    assert json.loads((newest / "template.json").read_text()) == {"template": "chat"}
    model, tok, template = load_chat_model(run)
    base_model, base_tok, _ = load_chat_model(base)
    assert template == "chat" and tok.vocab_size == base_tok.vocab_size + 4
    assert model.config.vocab_size == tok.vocab_size and "<|assistant|>" in tok.special_tokens
    prompt = render_prompt("chat", [{"role": "user", "content": "hi"}], tok)
    assert prompt[-2] == tok.special_tokens["<|assistant|>"]


@pytest.mark.parametrize("what", ["--lora.rank=0", "--lora.rank=4",
                                  "--instruct.pack=true --train.batch_size=1"])
def test_instruct_resumes_exactly(base, small_data, tmp_path, what):
    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
                                                     .read_text().splitlines()) if "loss" in r]

    args = ["--train.log_every=1", "--instruct.epochs=2", "--instruct.template=chat",
            *what.split()]
    instruct_trainer(config(base, small_data[1], *args), tmp_path / "full", progress=False,
                     log=lambda *_: None).run()
    stopped = instruct_trainer(config(base, small_data[1], *args), tmp_path / "split",
                               progress=False, log=lambda *_: None)
    stop = 3 if "pack" in what else 13  # the conversations fill 3 windows of 512 tokens
    stopped.step_callbacks.append(lambda t, step: setattr(t, "stop_requested", step == stop))
    assert stopped.run().step == stop
    instruct_trainer(config(base, small_data[1], *args), tmp_path / "split", resume="auto",
                     progress=False, log=lambda *_: None).run()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_lora_run_saves_adapters_and_embeddings_and_reloads(base, small_data, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    loop = instruct_trainer(config(base, small_data[1], "--instruct.template=chat",
                                   "--lora.rank=4"), run, progress=False, log=lambda *_: None)
    loop.run()
    saved = load_file(list_checkpoints(run)[-1] / "model.safetensors")
    assert all("lora_" in k or k.startswith(("tok_emb.", "lm_head.")) for k in saved)
    model, tok, template = load_chat_model(run)
    ids = torch.tensor([render_prompt("chat", [{"role": "user", "content": "hi"}], tok)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), loop.model.eval()(ids))
    assert template == "chat"
    # merged into a plain checkpoint: same logits, loadable without the base, DPO-ready
    assert main(["merge", "--checkpoint", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged, _, merged_template = load_chat_model(tmp_path / "merged")
    assert merged_template == "chat" and not (tmp_path / "merged" / "adapter.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=0)


def test_alpaca_sft_lowers_the_response_loss(base, small_data, tmp_path):
    loop = instruct_trainer(config(base, small_data[0], "--instruct.epochs=4",
                                   "--optim.lr=3e-3"), tmp_path, progress=False,
                            log=lambda *_: None)
    loop.setup()
    first = loop.evaluate()["val_loss"]
    loop.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r][-1]
    assert last["val_loss"] < 0.7 * first and isinstance(last["samples"], list)


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "x"}]', "neither 'messages' nor 'instruction' and 'output'"),
    ("[]", "holds no examples"),
    ('{"instruction"', "is not valid JSON"),
])
def test_bad_instruction_data_is_one_line(base, tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["finetune", "instruct", "--checkpoint", str(base), "--data", str(path),
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_unknown_template_is_one_line(base, capsys, tmp_path):
    assert main(["finetune", "instruct", "--checkpoint", str(base), "--template", "chatml",
                 "--out", str(tmp_path / "run")]) == 1
    assert "instruct.template = 'chatml'" in capsys.readouterr().err


def test_packing_fills_windows_and_keeps_the_loss(base, small_data, tmp_path):
    from scratchllm.finetune.instruct import packed_loss
    from scratchllm.train.pretrain import next_token_loss

    loop = instruct_trainer(config(base, small_data[1], "--instruct.template=chat",
                                   "--instruct.pack=true", "--train.batch_size=1"), tmp_path,
                            progress=False, log=lambda *_: None)
    loop.setup()
    batches = loop.recipe.batches
    assert batches.n < 40 and batches.packed.inputs.shape[1] == 512
    x, y, docs, pos = batches.packed  # every window, against its examples one at a time
    with torch.no_grad():
        packed = float(packed_loss(loop.model, (x, y, docs, pos)))
        separate = 0.0
        for r in range(len(x)):
            for d in range(int(docs[r].max()) + 1):
                keep = docs[r] == d
                row = (x[r][keep][None], y[r][keep][None])
                separate += float(next_token_loss(loop.model, row))
    assert packed == pytest.approx(separate, rel=1e-4)
