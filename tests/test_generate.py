"""Generation: strategies on hand-made logits, the KV-cache engine against full recomputation and
against transformers, beam search against exhaustive search, batching, streaming, stops, seeds."""

import itertools
import math
import warnings

import pytest
import torch

from scratchllm.errors import UserError
from scratchllm.generate import (
    GenerationConfig,
    History,
    SamplingConfig,
    TextStream,
    complete,
    frequency_presence_penalty,
    generate,
    generate_batch,
    min_p_filter,
    repetition_penalty,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from scratchllm.model import GPT, GPTConfig
from scratchllm.tokenizer import CharTokenizer, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


POS = ["learned", "sinusoidal", "rope", "alibi", "none"]
V = 97


def tiny(pos: str = "learned", context: int = 160, vocab: int = V, std: float = 0.5,
         **kw) -> GPT:
    """A random 2-layer model whose large weights give varied (not flat) predictions."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, context_length=context, n_layer=2, n_head=4, n_embd=32,
                    pos_encoding=pos, init_std=std, tie_embeddings=False, **kw)
    return GPT(cfg).eval()


def random_ids(n: int, seed: int, vocab: int = V) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def naive_greedy(model: GPT, prompt: list[int], n: int, frequency: float = 0.0,
                 slide: int | None = None) -> list[int]:
    """The reference: re-run the whole sequence every step (window slides like the engine's)."""
    ids, start, counts = list(prompt), 0, torch.zeros(model.config.vocab_size)
    C = model.config.context_length
    for _ in range(n):
        if len(ids) - start > C:
            start = len(ids) - (C - slide)
        logits = model(torch.tensor([ids[start:]]))[0, -1] - frequency * counts
        ids.append(int(logits.argmax()))
        counts[ids[-1]] += 1
    return ids[len(prompt):]


# ---- strategies on hand-made logits --------------------------------------------------------


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > -math.inf).flatten().tolist()) for row in logits]


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    assert kept(top_k_filter(logits, 1)) == [{0}, {4}]
    assert kept(top_k_filter(logits, 2)) == [{0, 2, 3}, {3, 4}]  # a tie with the k-th stays
    assert kept(top_k_filter(logits, 9)) == [set(range(5))] * 2
    assert torch.equal(top_k_filter(logits, 2)[0, [0, 2, 3]], logits[0, [0, 2, 3]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])  # second row: another order
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.4)) == [{0}, {1}]  # the top token alone reaches p
    assert kept(top_p_filter(logits, 0.5)) == [{0}, {1}]  # exactly p is enough
    assert kept(top_p_filter(logits, 0.6)) == [{0, 1}, {1, 2}]
    assert kept(top_p_filter(logits, 0.85)) == [{0, 1, 2}] * 2
    assert kept(top_p_filter(logits, 1.0)) == [{0, 1, 2}] * 2


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(min_p_filter(logits, 0.25)) == [{0, 1, 2}]  # threshold 0.125
    assert kept(min_p_filter(logits, 0.5)) == [{0, 1}]  # threshold 0.25
    assert kept(min_p_filter(logits, 0.9)) == [{0}]
    assert kept(min_p_filter(logits, 0.0)) == [{0, 1, 2, 3}]


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    counts = torch.tensor([[2.0, 0.0, 1.0]])
    out = frequency_presence_penalty(logits, counts, frequency=0.5, presence=1.0)
    assert out.tolist() == [[0.0, -2.0, -0.5]]
    # History: the prompt counts as seen (repetition) but not as generated (frequency/presence).
    history = History([[0, 2], [1]], vocab_size=3)
    history.add(torch.tensor([2, 2]))
    history.add(torch.tensor([2, 0]))
    assert history.seen.tolist() == [[True, False, True], [True, True, True]]
    assert history.counts.tolist() == [[0.0, 0.0, 2.0], [1.0, 0.0, 1.0]]


def test_greedy_applies_penalties_then_argmax():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    history = History([[0]], vocab_size=3)
    assert sample_next(logits, None, SamplingConfig(temperature=0)).tolist() == [0]
    cfg = SamplingConfig(temperature=0, repetition_penalty=1.1)
    assert sample_next(logits, history, cfg).tolist() == [1]


CASES = [  # (probabilities, config, kept tokens)
    ([0.3, 0.25, 0.2, 0.12, 0.08, 0.05], SamplingConfig(temperature=0.7, top_k=3), [0, 1, 2]),
    ([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], SamplingConfig(top_p=0.75), [0, 1, 2]),
    ([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], SamplingConfig(min_p=0.2), [0, 1, 2, 3]),
    ([0.3, 0.25, 0.2, 0.12, 0.08, 0.05],
     SamplingConfig(temperature=1.5, top_k=5, top_p=0.8, min_p=0.3), [0, 1, 2, 3]),
]


@pytest.mark.parametrize("probs, cfg, keep", CASES)
def test_sampling_frequencies_match_the_renormalised_distribution(probs, cfg, keep):
    n = 20_000
    logits = torch.tensor(probs, dtype=torch.float64).log()
    scaled = torch.softmax(logits / cfg.temperature, dim=0)
    expected = torch.zeros(len(probs), dtype=torch.float64)
    expected[keep] = scaled[keep] / scaled[keep].sum()
    # The check has power: dropping the filter or the renormalisation misses by far more.
    assert (expected - scaled).abs().max() > 0.05
    draws = sample_next(logits.float().expand(n, -1), None, cfg,
                        torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(probs)).double() / n
    assert set(torch.nonzero(freq).flatten().tolist()) == set(keep)  # filtered tokens never
    assert (freq - expected).abs().max() < 0.012  # ~3.5 standard errors at p = 0.3
    chi2 = float((n * (freq[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 20.5  # chi-square, df <= 5: passes by chance with probability 0.999


def test_sampling_options_are_validated():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                dict(min_p=2.0), dict(repetition_penalty=0.0), dict(max_new_tokens=-1),
                dict(num_beams=0), dict(num_beams=2, top_k=5), dict(context_policy="wrap")):
        with pytest.raises(UserError):
            GenerationConfig(**bad)


# ---- the engine: KV cache against full recomputation ---------------------------------------


@pytest.mark.parametrize("pos", POS)
def test_greedy_with_cache_equals_full_recomputation(pos):
    model, prompt = tiny(pos), random_ids(29, 1)
    want = naive_greedy(model, prompt, 120)
    assert generate(model, prompt, max_new_tokens=120, temperature=0.0) == want
    assert generate(model, prompt, max_new_tokens=120, temperature=0.0, use_cache=False) == want
    # Random models soon repeat one token; a frequency penalty keeps the path varied.
    want = naive_greedy(model, prompt, 120, frequency=0.5)
    assert len(set(want[-60:])) > 20
    got = generate(model, prompt, max_new_tokens=120, temperature=0, frequency_penalty=0.5)
    assert got == want


def test_kv_cache_grows_by_64_slots(monkeypatch):
    model, prompt = tiny(context=320), random_ids(29, 1)
    want = naive_greedy(model, prompt, 230)
    read = []  # (slots of the cache the model is handed, slots written after the call)
    forward = model.forward

    def spy(idx, *args, cache=None, input_pos=None, **kw):
        read.append((cache[0].max_seq, int(input_pos[-1]) + 1))
        return forward(idx, *args, cache=cache, input_pos=input_pos, **kw)

    monkeypatch.setattr(model, "forward", spy)
    got = generate(model, prompt, max_new_tokens=230, temperature=0.0)
    assert got == want  # the same tokens as recomputing everything
    assert read[0] == (64, 29) and len(read) == 230  # the prompt, then one call per token
    # The cache holds the written slots rounded up to 64 (at most the 258 this run needs), not
    # a power of two: 192 slots, not 256, while 129-192 are written.
    assert all(slots == min(-(-used // 64) * 64, 258) for slots, used in read)
    assert (192, 150) in read and read[-1] == (258, 258)


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_sliding_window_past_the_context(pos):
    model, prompt = tiny(pos, context=32), random_ids(20, 2)
    want = naive_greedy(model, prompt, 70, frequency=0.5, slide=8)
    got = generate(model, prompt, max_new_tokens=70, temperature=0, frequency_penalty=0.5)
    assert got == want
    got = generate(model, prompt, max_new_tokens=70, temperature=0, frequency_penalty=0.5,
                   slide_tokens=3)
    assert got == naive_greedy(model, prompt, 70, frequency=0.5, slide=3)


def test_context_policy_stop_and_long_prompts():
    model, prompt = tiny(context=32), random_ids(20, 3)
    [done] = complete(model, [prompt], GenerationConfig(max_new_tokens=50, temperature=0,
                                                        context_policy="stop"))
    assert done.finish_reason == "context" and len(done.ids) == 32 - 20 + 1
    assert done.ids == generate(model, prompt, max_new_tokens=13, temperature=0)
    long = random_ids(40, 4)
    with pytest.raises(UserError, match="truncate"):
        generate(model, long, max_new_tokens=5)
    assert generate(model, long, max_new_tokens=5, temperature=0, truncate_prompt=True) == \
        generate(model, long[-32:], max_new_tokens=5, temperature=0)


def test_bad_prompts_and_zero_tokens():
    model = tiny()
    with pytest.raises(UserError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(UserError, match="0..96"):
        generate(model, [5, V], max_new_tokens=3)
    assert generate(model, [1, 2], max_new_tokens=0) == []


# ---- parity with transformers --------------------------------------------------------------


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _hf_model(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=160, n_embd=32, n_layer=2,
                                           n_head=4, bos_token_id=None, eos_token_id=None))
    else:  # grouped-query attention: 4 query heads share 2 key/value heads
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
            bos_token_id=None, eos_token_id=None, tie_word_embeddings=False))
    _perturb(model.eval(), 1)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(kind):
    from scratchllm.model.convert import from_hf

    hf = _hf_model(kind)
    ours = from_hf(hf).eval()
    assert ours.config.n_kv_head == (2 if kind == "llama" else 4)
    prompt = random_ids(30, 5)
    for penalty in (1.0, 1.3):  # transformers' repetition penalty is CTRL's, as ours
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=120,
                              repetition_penalty=penalty, pad_token_id=0)
        want = out[0, len(prompt):].tolist()
        assert len(want) == 120
        assert generate(ours, prompt, max_new_tokens=120, temperature=0,
                        repetition_penalty=penalty) == want


# ---- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_batch_equals_one_by_one(pos):
    model = tiny(pos, context=48)
    prompts = [random_ids(n, 10 + n) for n in (3, 11, 1, 7)]
    options = dict(temperature=0, frequency_penalty=0.5)
    alone = [generate(model, p, max_new_tokens=30, **options) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=30, **options) == alone
    # A stop token ends each row on its own: pick one that occurs mid-way in some rows.
    stop = alone[1][12]
    alone = [generate(model, p, max_new_tokens=30, stop_ids=[stop], **options)
             for p in prompts]
    assert any(len(ids) < 30 for ids in alone) and any(len(ids) == 30 for ids in alone)
    batched = generate_batch(model, prompts, max_new_tokens=30, stop_ids=[stop], **options)
    assert batched == alone and all(stop not in ids for ids in batched)
    # Past the context the window slides; with padding it matches the recomputed window.
    long = dict(max_new_tokens=60, **options)
    assert generate_batch(model, prompts, **long) == \
        generate_batch(model, prompts, use_cache=False, **long)


# ---- beam search ---------------------------------------------------------------------------


@torch.no_grad()
def exhaustive(model: GPT, prompt: list[int], n: int, stop: int | None, alpha: float):
    """The best (score, ids) over every sequence of up to n tokens, ending at a stop token."""
    vocab = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=n)))  # (V^n, n)
    x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs[:, :-1]], dim=1)
    logp = torch.log_softmax(model(x)[:, len(prompt) - 1:].double(), dim=-1)
    token_logp = logp.gather(-1, seqs[..., None])[..., 0]  # (V^n, n)
    best = (-math.inf, [])
    for seq, lps in zip(seqs.tolist(), token_logp.tolist(), strict=True):
        length = seq.index(stop) + 1 if stop in seq else n
        score = sum(lps[:length]) / length ** alpha
        if score > best[0]:
            best = (score, [t for t in seq[:length] if t != stop])
    return best


@pytest.mark.parametrize("stop, alpha", [(None, 1.0), (0, 0.0), (0, 1.0), (0, 2.0), (2, -1.0)])
def test_beam_search_equals_exhaustive_search(stop, alpha):
    model, prompt, n = tiny(vocab=4, std=1.0), [1, 3, 2], 4
    score, ids = exhaustive(model, prompt, n, stop, alpha)
    # 4^4 beams keep every partial sequence, so beam search must find the true best.
    [done] = complete(model, [prompt], GenerationConfig(
        max_new_tokens=n, num_beams=4 ** n, length_penalty=alpha,
        stop_ids=() if stop is None else (stop,)))
    assert done.ids == ids
    assert done.score == pytest.approx(score, abs=1e-4)


def test_one_beam_is_greedy_and_beams_improve_the_score():
    model, prompt = tiny(vocab=8, std=1.0), [1, 2, 3]
    greedy = generate(model, prompt, max_new_tokens=6, temperature=0)
    assert generate(model, prompt, max_new_tokens=6, num_beams=1, temperature=0) == greedy
    [one] = complete(model, [prompt], GenerationConfig(max_new_tokens=6, num_beams=1,
                                                       temperature=0))
    [wide] = complete(model, [prompt], GenerationConfig(max_new_tokens=6, num_beams=4))
    [greedy_beam] = complete(model, [prompt], GenerationConfig(max_new_tokens=6, num_beams=2,
                                                               early_stopping=True))
    assert wide.score >= greedy_beam.score - 1e-6 and len(wide.ids) == 6 and one.ids == greedy
    # The score is the sequence's own: its summed log-probability under the model / length.
    with torch.no_grad():
        logits = model(torch.tensor([prompt + wide.ids]))[0, len(prompt) - 1:-1].double()
    logp = torch.log_softmax(logits, dim=-1)[torch.arange(6), wide.ids].sum().item()
    assert wide.score == pytest.approx(logp / 6, abs=1e-5)


# ---- text: streaming and stop strings ------------------------------------------------------


def byte_tokenizer() -> Tokenizer:
    return Tokenizer([bytes([i]) for i in range(256)], [])


def test_stream_never_splits_a_character():
    tok, text = byte_tokenizer(), "héllo ✓ 日本 😀!"
    ts = TextStream(tok)
    pieces = [ts.push(b) for b in text.encode("utf-8")] + [ts.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1:3] == ["", "é"]  # the first byte of é alone yields nothing
    ts = TextStream(tok)
    assert ts.push(0xE2) + ts.push(0x9C) == "" and ts.flush() == "\ufffd"  # dangling bytes


def test_stop_strings_are_held_back_and_cut():
    tok = byte_tokenizer()
    ts = TextStream(tok, ["\n\nEND", "STOP"])
    pieces = [ts.push(b) for b in b"ab\n\nEN"]
    assert "".join(pieces) == "ab"  # "\n\nEN" could still become "\n\nEND"
    assert ts.push(ord("x")) == "\n\nENx" and not ts.stopped  # it did not
    for b in b"yST":
        ts.push(b)
    assert ts.push(ord("O")) == "" and ts.push(ord("P")) == "" and ts.stopped
    assert ts.final_text() == "ab\n\nENxy" and ts.kept_tokens() == 8 and ts.flush() == ""
    ts = TextStream(tok, ["b"])
    assert ts.push(ord("a")) == "a" and ts.push(ord("b")) == "" and ts.kept_tokens() == 1


def test_stream_and_stop_strings_end_to_end():
    tok = byte_tokenizer()
    model = tiny(vocab=tok.vocab_size, context=64)
    prompt = list(b"The ")
    ids = generate(model, prompt, max_new_tokens=40, temperature=0, frequency_penalty=0.5)
    full = tok.decode(ids)
    pieces = list(stream(model, tok, prompt, max_new_tokens=40, temperature=0,
                         frequency_penalty=0.5))
    assert "".join(pieces) == full
    # Stop at a text that starts at the 15th byte: nothing from it on is returned.
    stop = tok.decode(ids[15:18])
    out = []
    pieces = list(stream(model, tok, prompt, max_new_tokens=40, temperature=0,
                         frequency_penalty=0.5, stop_strings=[stop], out=out))
    cut = full[:full.index(stop)]
    assert "".join(pieces) == cut == out[0].text and out[0].finish_reason == "stop"
    assert tok.decode(out[0].ids) == cut and len(out[0].ids) <= 15
    with pytest.raises(UserError, match="tokenizer"):
        generate(model, prompt, max_new_tokens=3, stop_strings=["x"])


def test_stop_strings_with_a_char_tokenizer():
    tok = CharTokenizer.train(["abcdefgh ijklmnop"])
    model = tiny(vocab=tok.vocab_size, context=64)
    prompt = tok.encode("abc")
    full = tok.decode(generate(model, prompt, max_new_tokens=30, temperature=0,
                               frequency_penalty=0.5))
    stop = full[10:12]
    [done] = complete(model, [prompt], GenerationConfig(
        max_new_tokens=30, temperature=0, frequency_penalty=0.5, stop_strings=(stop,)), tok)
    assert done.text == full[:full.index(stop)]
    # Ids end with the last token before the stop (a multi-character special may straddle it).
    assert done.text.startswith(tok.decode(done.ids)) and stop not in tok.decode(done.ids)


# ---- seeds ---------------------------------------------------------------------------------


def test_seed_reproducible_and_global_rng_untouched():
    model = tiny(embd_dropout=0.1, resid_dropout=0.1).train()  # dropout would draw from it
    prompt = random_ids(5, 6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, prompt, max_new_tokens=40, temperature=1.0, top_k=None, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training  # the mode is restored
    assert generate(model, prompt, max_new_tokens=40, temperature=1.0, seed=0) == a
    assert generate(model, prompt, max_new_tokens=40, temperature=1.0, seed=1) != a
    assert generate(model.eval(), prompt, max_new_tokens=40, temperature=1.0, seed=0) == a
    assert torch.equal(torch.get_rng_state(), state)
    # Without a seed sampling follows torch's global RNG.
    torch.manual_seed(7)
    b = generate(model, prompt, max_new_tokens=20)
    torch.manual_seed(7)
    assert generate(model, prompt, max_new_tokens=20) == b


def test_generation_leaves_the_model_unchanged():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    generate(model, [1, 2, 3], max_new_tokens=10, seed=0)
    complete(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=5, num_beams=3))
    assert [n for n, _ in model.named_modules()] == names  # no cache left attached
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inverse_cdf_draws_from_the_distribution():
    # One uniform number per row: frequencies follow the probabilities, and a token of
    # probability 0 is never drawn, even at u's very top.
    from scratchllm.generate.sampling import inverse_cdf

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(100_000, 5).contiguous()
    counts = torch.bincount(inverse_cdf(probs, torch.rand(len(probs), 1)), minlength=5)
    assert torch.allclose(counts / len(probs), probs[0], atol=0.01) and counts[1] == counts[4] == 0
    assert inverse_cdf(probs[:2], torch.tensor([[1.0], [0.0]])).tolist() == [3, 0]
