"""One loader for every consumer: a LoRA instruction run (adapters + grown embeddings, its base
named in adapter.json) generates, chats, evaluates, converts and DPO-tunes like a plain
checkpoint, and gives the same tokens as its merged copy."""

import json
import shutil

import pytest
import torch

from scratchllm.checkpoint import list_checkpoints, load_chat_model, load_for_inference
from scratchllm.cli import main
from scratchllm.config import load_config
from scratchllm.errors import UserError
from scratchllm.finetune.instruct import InstructConfig, instruct_trainer
from scratchllm.finetune.preference import DPOConfig, dpo_trainer
from scratchllm.generate import generate
from scratchllm.model import GPT, GPTConfig
from scratchllm.tokenizer import Tokenizer

PROMPT = "<|user|>\nsay yes<|end|><|assistant|>\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory, shakespeare_small):
    """A tiny random GPT-2-style model with a small byte-level BPE (exportable to HF)."""
    torch.manual_seed(0)
    tok = Tokenizer.train([shakespeare_small[:20_000]], vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_layer=1, n_head=2,
                          n_embd=32))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.json"
    path.write_text(json.dumps([{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"}
                                for w in ("yes", "no", "maybe", "soon") * 5]))
    return path


@pytest.fixture(scope="module")
def lora_run(base, records, tmp_path_factory):
    """(run dir, the trained model with live adapters) of a LoRA chat-template run."""
    run = tmp_path_factory.mktemp("lora")
    cfg = load_config(None, [f"--instruct.checkpoint={base}", f"--instruct.data={records}",
                             "--instruct.template=chat", "--instruct.epochs=1",
                             "--instruct.eval_prompts=0", "--lora.rank=4", "--optim.lr=3e-2",
                             "--train.batch_size=4", "--train.threads=1"], InstructConfig)
    loop = instruct_trainer(cfg, run, progress=False, log=lambda *_: None)
    loop.run()
    return run, loop.model.eval()


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_generate_from_a_lora_run_equals_the_merged_checkpoint(base, lora_run, tmp_path,
                                                               capsys):
    run, trained = lora_run
    merged = tmp_path / "merged"
    cli(capsys, "merge", "--checkpoint", run, "--out", merged)
    texts = [json.loads(cli(capsys, "generate", "--checkpoint", path, "--prompt", PROMPT,
                            "--temperature", "0", "--max-new-tokens", "12", "--ignore-eot",
                            "--device", "cpu", "--json"))["samples"][0]["text"]
             for path in (run, merged)]
    model, tok, template = load_chat_model(run, "cpu")
    ids = tok.encode(PROMPT, allowed_special="all")
    live = tok.decode(generate(trained, ids, 12, temperature=0.0))  # adapters not merged
    assert texts[0] == texts[1] == live and template == "chat"
    x, words = torch.tensor([ids]), torch.tensor([tok.encode("say yes")])
    plain, _ = load_for_inference(base)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), atol=1e-5, rtol=0)
        assert (model(words)[..., :plain.config.vocab_size] - plain(words)).abs().max() > 1e-3


def test_chat_evaluate_and_convert_load_a_lora_run(lora_run, records, tmp_path, capsys):
    import transformers

    run, _ = lora_run
    cli(capsys, "chat", "--checkpoint", run, "--prompt", "say yes", "--temperature", "0",
        "--max-new-tokens", "4", "--device", "cpu")
    cli(capsys, "evaluate", "--checkpoint", run, "--data", records, "--limit", "2",
        "--max-new-tokens", "4", "--device", "cpu", "--out", tmp_path / "eval.jsonl")
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 2
    cli(capsys, "convert", "--to-hf", "--checkpoint", run, "--out", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok = load_for_inference(run)
    conversation = [{"role": "user", "content": "say yes"}]
    ids = list(hf_tok.apply_chat_template(conversation, add_generation_prompt=True,
                                          tokenize=True, return_dict=False))
    assert ids == tok.encode(PROMPT, allowed_special="all")
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])),
                                   atol=1e-5, rtol=0)


def test_dpo_tunes_a_lora_run_and_lora_dpo_stacks_on_it(lora_run, tmp_path):
    run, _ = lora_run
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": f"say {w}", "input": "", "chosen": f"{w} {w}",
                                  "rejected": "no"} for w in ("yes", "maybe") * 10]))
    for rank in (0, 2):
        cfg = load_config(None, [f"--dpo.checkpoint={run}", f"--dpo.data={pairs}",
                                 f"--lora.rank={rank}", "--train.max_steps=2", "--dpo.epochs=0",
                                 "--train.batch_size=4", "--train.threads=1",
                                 "--optim.lr=1e-2"], DPOConfig)
        out = tmp_path / f"dpo-{rank}"
        dpo_trainer(cfg, out, progress=False, log=lambda *_: None).run()
        adapters = (list_checkpoints(out)[-1] / "adapter.json").is_file()
        assert adapters == (rank > 0)  # a LoRA DPO run names the LoRA SFT run as its base
        model, _, template = load_chat_model(out, "cpu")  # rebuilt through both adapters
        assert template == "chat" and model.config.vocab_size == 304


def test_a_lora_run_whose_base_is_gone_or_changed_is_refused(lora_run, base, tmp_path):
    run, _ = lora_run
    copy = tmp_path / "copy"
    shutil.copytree(list_checkpoints(run)[-1], copy)
    adapter = json.loads((copy / "adapter.json").read_text())
    for where, message in ((tmp_path / "nowhere", "is gone"), (copy, "changed since")):
        (copy / "adapter.json").write_text(json.dumps({**adapter,
                                                       "base_checkpoint": str(where)}))
        with pytest.raises(UserError, match=message) as info:
            load_for_inference(copy)
        assert "\n" not in str(info.value)
