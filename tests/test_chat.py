"""Chat and instruction templates: exact text, loss masks, batches, packing, HF parity."""

import json

import pytest
import torch

from scratchllm.data.chat import (
    CHAT_SPECIALS,
    document_mask,
    ensure_special_tokens,
    get_template,
    hf_chat_template,
    pack,
    pad_sft_batch,
    render,
    render_prompt,
)
from scratchllm.data.formats import alpaca_text
from scratchllm.errors import UserError
from scratchllm.model import GPT, IGNORE_INDEX, GPTConfig, explicit_attention, sdpa_attention
from scratchllm.model.resize import grow_vocab

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, of course."},
]
RECORD = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "It sat."}


@pytest.fixture(scope="module")
def chat_tok(gpt2_tok):
    return ensure_special_tokens(gpt2_tok, CHAT_SPECIALS)


def spans(ids, mask, tok):
    """The learned stretches of a rendering, decoded."""
    out, run = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            out, run = out + [tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])


def test_alpaca_exact_text_and_mask(gpt2_tok):
    ids, mask = render("alpaca", RECORD, gpt2_tok)
    text = alpaca_text(RECORD["instruction"], RECORD["input"], RECORD["output"])
    assert text.startswith("Below is an instruction that describes a task. Write a response that "
                           "appropriately completes the request.\n\n### Instruction:\n")
    assert gpt2_tok.decode(ids) == text + "<|endoftext|>"
    assert spans(ids, mask, gpt2_tok) == ["It sat.<|endoftext|>"]
    assert mask[-1] and ids[-1] == gpt2_tok.eot_id
    prompt = render_prompt("alpaca", RECORD, gpt2_tok)
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    assert gpt2_tok.decode(prompt).endswith("### Response:\n")
    no_input, _ = render("alpaca", {"instruction": "Say hi.", "output": "Hi."}, gpt2_tok)
    assert "### Input:" not in gpt2_tok.decode(no_input)


def test_chat_multi_turn_mask(chat_tok):
    ids, mask = render("chat", CONVERSATION, chat_tok)
    assert chat_tok.decode(ids) == (
        "<|system|>\nYou are terse.<|end|><|user|>\nName a colour.<|end|>"
        "<|assistant|>\nBlue.<|end|><|user|>\nAnother one?<|end|>"
        "<|assistant|>\nGreen, of course.<|end|>")
    # Learned: each assistant content (its leading newline included) and its <|end|>, only.
    assert spans(ids, mask, chat_tok) == ["\nBlue.<|end|>", "\nGreen, of course.<|end|>"]
    end, asst = chat_tok.special_id("<|end|>"), chat_tok.special_id("<|assistant|>")
    learned = [i for i, m in enumerate(mask) if m]
    ends = [i for i, t in enumerate(ids) if t == end]
    assert [i for i in ends if mask[i]] == [ends[2], ends[4]]  # only the assistant turns' ends
    assert not any(mask[i] for i, t in enumerate(ids) if t == asst)  # headers never learned
    first = ids.index(asst) + 1
    assert learned[0] == first and learned[-1] == len(ids) - 1


def test_train_on_prompt_learns_everything(chat_tok):
    ids, mask = render("chat", CONVERSATION, chat_tok, train_on_prompt=True)
    assert ids == render("chat", CONVERSATION, chat_tok)[0] and all(mask)


def test_pad_sft_batch_targets(chat_tok):
    short = render("chat", CONVERSATION[1:3], chat_tok)
    long = render("chat", CONVERSATION, chat_tok)
    inputs, targets = pad_sft_batch([short, long], pad_id=0)
    assert inputs.shape == targets.shape == (2, len(long[0]) - 1)
    n = len(short[0]) - 1
    assert inputs[0, :n].tolist() == short[0][:-1] and (inputs[0, n:] == 0).all()
    assert (targets[0, n:] == IGNORE_INDEX).all()
    for row, (ids, mask) in enumerate([short, long]):
        for t in range(len(ids) - 1):
            want = ids[t + 1] if mask[t + 1] else IGNORE_INDEX
            assert targets[row, t].item() == want


def test_special_tokens_and_embedding_growth(gpt2_tok):
    tok = ensure_special_tokens(gpt2_tok, CHAT_SPECIALS)
    assert tok.vocab_size == gpt2_tok.vocab_size + 4
    assert [tok.special_id(t) for t in CHAT_SPECIALS] == list(range(50257, 50261))
    assert tok.encode("hello world") == gpt2_tok.encode("hello world")
    assert ensure_special_tokens(tok, CHAT_SPECIALS) is tok
    torch.manual_seed(0)
    for tied in (True, False):
        cfg = GPTConfig(vocab_size=300, context_length=32, n_layer=1, n_head=2, n_embd=16,
                        tie_embeddings=tied)
        model = GPT(cfg).eval()
        idx = torch.randint(0, 300, (2, 10))
        before = model(idx)
        old_emb = model.tok_emb.weight.detach().clone()
        old_head = model.lm_head.weight.detach().clone()
        grow_vocab(model, 304)
        assert model.config.vocab_size == 304 and model.tok_emb.weight.shape == (304, 16)
        assert torch.equal(model.tok_emb.weight[:300], old_emb)
        assert torch.equal(model.lm_head.weight[:300], old_head)
        assert torch.allclose(model.tok_emb.weight[300:], old_emb.mean(0).expand(4, -1))
        assert torch.allclose(model.lm_head.weight[300:], old_head.mean(0).expand(4, -1))
        assert (model.lm_head.weight is model.tok_emb.weight) == tied
        after = model(idx)
        assert after.shape == (2, 10, 304) and torch.equal(after[..., :300], before)
        model(torch.tensor([[303, 1]]))  # new ids embed
    with pytest.raises(UserError, match="shrink"):
        grow_vocab(model, 10)


def test_packing_layout(chat_tok):
    examples = [render("chat", CONVERSATION[i:i + 2], chat_tok) for i in (1, 3)]
    examples.append(render("chat", CONVERSATION, chat_tok))
    lengths = [len(ids) - 1 for ids, _ in examples]
    window = lengths[2]  # the first two share a window; the long one fills the next
    assert lengths[0] + lengths[1] < window
    packed = pack(examples, window)
    assert packed.inputs.shape == (2, window)
    n_pad = window - lengths[0] - lengths[1]
    assert packed.doc_ids[0].tolist() == [0] * lengths[0] + [1] * lengths[1] + [-1] * n_pad
    assert packed.positions[0, lengths[0]:window - n_pad].tolist() == list(range(lengths[1]))
    assert (packed.targets[0, -n_pad:] == IGNORE_INDEX).all()
    assert packed.doc_ids[1].tolist() == [0] * window
    for row, docs in ((0, (0, 1)), (1, (2,))):
        for d, e in zip(range(len(docs)), docs, strict=True):
            x, y = pad_sft_batch([examples[e]], 0)
            sel = packed.doc_ids[row] == d
            assert torch.equal(packed.inputs[row, sel], x[0])
            assert torch.equal(packed.targets[row, sel], y[0])
    with pytest.raises(UserError, match="packing window"):
        pack(examples, 4)


@pytest.mark.parametrize("kernel", [explicit_attention, sdpa_attention])
def test_packed_attention_matches_separate_documents(kernel):
    torch.manual_seed(0)
    lengths, W, H, hd = (3, 5, 2), 12, 2, 8
    docs = [torch.randn(3, 1, H, n, hd) for n in lengths]  # q, k, v per document
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] + [-1, -1]])
    pad = torch.randn(3, 1, H, W - sum(lengths), hd)
    q, k, v = torch.cat([*docs, pad], dim=3)
    packed = kernel(q, k, v, document_mask(doc_ids), causal=True)  # (1, H, W, hd)
    start = 0
    for n, (dq, dk, dv) in zip(lengths, docs, strict=True):
        alone = kernel(dq, dk, dv, causal=True)
        torch.testing.assert_close(packed[:, :, start:start + n], alone)
        start += n
    assert torch.isfinite(packed).all()


def test_packed_loss_equals_unpacked(chat_tok):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=chat_tok.vocab_size, context_length=128, n_layer=2, n_head=2,
                    n_embd=32, pos_encoding="rope")
    model = GPT(cfg).eval()
    examples = [render("chat", CONVERSATION[i:i + 2], chat_tok) for i in (1, 3)]
    examples.append(render("chat", CONVERSATION, chat_tok))
    inputs, targets = pad_sft_batch(examples, 0)
    attn = (torch.arange(inputs.shape[1]) < torch.tensor([len(i) - 1 for i, _ in examples])[:,
            None]).long()
    _, unpacked = model(inputs, targets, attention_mask=attn)
    p = pack(examples, 96)
    _, packed = model(p.inputs, p.targets, positions=p.positions, document_ids=p.doc_ids)
    torch.testing.assert_close(packed, unpacked)


def hf_tokenizer(tok, path):
    """transformers' AutoTokenizer over our exported tokenizer plus the chat template."""
    import transformers
    tok.export_hf(path / "tokenizer.json")
    added = {str(i): {"content": name, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True}
             for name, i in tok.special_tokens.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
              "eos_token": "<|end|>", "chat_template": hf_chat_template("chat")}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(path)


def test_hf_chat_template_parity(chat_tok, tmp_path):
    hf = hf_tokenizer(chat_tok, tmp_path)
    conversations = [CONVERSATION, CONVERSATION[1:3],
                     [{"role": "user", "content": "  spaces\n\nand lines  "},
                      {"role": "assistant", "content": "héllo wörld 😀 <not|special>"}]]
    for conv in conversations:
        ids = hf.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert list(ids) == render("chat", conv, chat_tok)[0]
        prompt = hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
        ours = render_prompt("chat", conv[:-1], chat_tok)
        assert list(prompt) == ours
        assert chat_tok.decode(ours).endswith("<|assistant|>\n")
    with pytest.raises(UserError, match="only the chat template"):
        hf_chat_template("alpaca")


def test_errors(chat_tok, gpt2_tok):
    with pytest.raises(UserError, match="did you mean 'chat'"):
        get_template("chatt")
    cases = [
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
         "empty assistant response"),
        ({"instruction": "x"}, "missing field"),
        ([{"role": "user"}], "must have 'role' and 'content'"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
          {"role": "assistant", "content": "c"}], "only the first"),
        ("just text", "list of messages"),
    ]
    for example, message in cases:
        with pytest.raises(UserError, match=message) as info:
            render("chat", example, chat_tok)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="longer than the maximum 8"):
        render("chat", CONVERSATION, chat_tok, max_length=8)
    with pytest.raises(UserError, match="lacks the chat template's special tokens"):
        render("chat", CONVERSATION, gpt2_tok)
    with pytest.raises(UserError, match="alpaca template takes one user"):
        render("alpaca", CONVERSATION, gpt2_tok)


def test_convert_to_hf_exports_chat_template(chat_tok, tmp_path):
    import transformers

    from scratchllm.cli.convert import export_hf

    torch.manual_seed(0)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    GPT(GPTConfig(vocab_size=chat_tok.vocab_size, context_length=64, n_layer=1, n_head=2,
                  n_embd=16)).save_pretrained(ckpt)
    chat_tok.save(ckpt / "tokenizer.json")
    export_hf(ckpt, out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert list(ids) == render("chat", CONVERSATION, chat_tok)[0]
