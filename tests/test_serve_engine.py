"""The continuous-batching engine, stepped by hand: a request decoded among others gives what it
gives alone (greedy and seeded sampling, against generate() as the oracle), rows join, leave and
move in the shared cache, stops, cancellation, the bounded queue, and the background thread."""

import threading

import pytest
import torch

from scratchllm.errors import UserError
from scratchllm.generate import generate
from scratchllm.generate.sampling import SamplingConfig
from scratchllm.model import GPT, GPTConfig
from scratchllm.serve.engine import Delta, Done, Engine, QueueFull, Request
from scratchllm.tokenizer import CharTokenizer, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n0123456789"
CONTEXT = 64


def tiny_model(vocab_size: int, pos_encoding: str = "rope", context: int = CONTEXT) -> GPT:
    """Random weights, scaled up so that the next token depends on the context."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=context, n_layer=2, n_head=2,
                         n_embd=32, pos_encoding=pos_encoding, init_std=0.3)).eval()


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train([TEXT])


class Recorder:
    """The events of one request: its tokens, text and end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.done: Done | None = None

    def __call__(self, event) -> None:
        if isinstance(event, Done):
            assert self.done is None, "two Done events"
            self.done = event
            return
        assert isinstance(event, Delta) and self.done is None
        self.tokens.append(event.token)
        self.text += event.text


def request(prompt: list[int], max_tokens: int, **kw) -> tuple[Request, Recorder]:
    rec = Recorder()
    return Request(prompt, max_tokens, emit=rec, **kw), rec


def run(engine: Engine, schedule: dict[int, list[Request]], steps: int = 1000) -> None:
    """Step the engine, submitting schedule[s] before step s, until nothing is left."""
    for s in range(steps):
        if s in schedule:
            engine.submit(*schedule[s])
        engine.step()
        if s > max(schedule) and not engine._rows and not engine._waiting:
            return
    raise AssertionError("the engine did not finish")


def prompts_of(lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("pos_encoding", ["rope", "learned", "alibi"])
def test_batched_greedy_equals_alone(tok, pos_encoding, monkeypatch):
    model = tiny_model(tok.vocab_size, pos_encoding)
    lengths, budgets = [3, 20, 9, 41, 14, 30, 5], [40, 30, 50, 30, 45, 60, 20]
    prompts = prompts_of(lengths, tok.vocab_size)
    moves = []
    engine = Engine(model, tok, slots=3)
    real_move = engine._move
    monkeypatch.setattr(engine, "_move", lambda col: (moves.append(col - engine._col),
                                                      real_move(col)))
    pairs = [request(p, m) for p, m in zip(prompts, budgets, strict=True)]
    reqs = [r for r, _ in pairs]
    run(engine, {0: reqs[:2], 4: reqs[2:5], 25: reqs[5:]})
    assert engine.steps < sum(len(rec.tokens) for _, rec in pairs)  # steps were shared
    assert any(m > 0 for m in moves) and any(m < 0 for m in moves)  # rows moved both ways
    for prompt, budget, (_, rec) in zip(prompts, budgets, pairs, strict=True):
        cap = min(budget, CONTEXT - len(prompt))  # prompt + reply fit the context
        assert rec.tokens == generate(model, prompt, cap, temperature=0)
        assert rec.done.finish_reason == "length"
        assert (rec.done.prompt_tokens, rec.done.completion_tokens) == (len(prompt), cap)
    alone = Engine(model, tok, slots=1)
    req, rec = request(prompts[3], budgets[3])
    run(alone, {0: [req]})
    assert rec.tokens == pairs[3][1].tokens


def test_seeded_sampling_is_the_same_in_any_company(tok):
    model = tiny_model(tok.vocab_size)
    sampling = dict(temperature=0.9, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.3)
    prompt = prompts_of([12], tok.vocab_size)[0]
    expected = generate(model, prompt, 30, seed=7, **sampling)
    engine = Engine(model, tok, slots=4)
    mine, rec = request(prompt, 30, sampling=SamplingConfig(**sampling), seed=7)
    others = [request(p, 25, sampling=SamplingConfig(temperature=1.0))[0]
              for p in prompts_of([5, 30, 17], tok.vocab_size)]
    run(engine, {0: others[:2], 3: [mine], 6: others[2:]})
    assert rec.tokens == expected


def test_rows_sampled_together_keep_their_own_seeds(tok):
    # Rows with the same settings are sampled in one batch (one softmax, seeded draws per row):
    # each seeded row still gives what generate() gives alone; greedy and unseeded rows mixed in.
    model = tiny_model(tok.vocab_size)
    sampling = dict(temperature=0.8, top_p=0.95)
    prompts = prompts_of([12, 7, 20, 3], tok.vocab_size)
    seeded = [request(p, 25, sampling=SamplingConfig(**sampling), seed=s)
              for s, p in enumerate(prompts)]
    greedy, rec_greedy = request(prompts[0], 25)
    unseeded = request(prompts[1], 25, sampling=SamplingConfig(**sampling))[0]
    engine = Engine(model, tok, slots=6)
    later = [unseeded, *(r for r, _ in seeded[2:])]
    run(engine, {0: [r for r, _ in seeded[:2]] + [greedy], 2: later})
    for s, (prompt, (_, rec)) in enumerate(zip(prompts, seeded, strict=True)):
        assert rec.tokens == generate(model, prompt, 25, seed=s, **sampling)
    assert rec_greedy.tokens == generate(model, prompts[0], 25, temperature=0)


def test_prompts_are_prefilled_together_within_the_budget(tok):
    # Waiting prompts are read in one left-padded forward, as many as fit prefill_tokens
    # (padded size); each still decodes what it would alone.
    model = tiny_model(tok.vocab_size)
    prompts = prompts_of([8, 3, 8, 5], tok.vocab_size)
    pairs = [request(p, 10) for p in prompts]
    engine = Engine(model, tok, slots=4, prefill_tokens=24)
    engine.submit(*(r for r, _ in pairs))
    engine.step()  # 8 + 3 -> 2 x 8 = 16; a third makes 3 x 8 = 24; a fourth 4 x 8 > 24
    assert engine.stats()["active"] == 3 and engine.stats()["waiting"] == 1
    run(engine, {0: []})
    for prompt, (_, rec) in zip(prompts, pairs, strict=True):
        assert rec.tokens == generate(model, prompt, 10, temperature=0)


def test_stop_strings_and_stop_ids(tok):
    model = tiny_model(tok.vocab_size)
    prompt = prompts_of([10], tok.vocab_size)[0]
    full = tok.decode(generate(model, prompt, 30, temperature=0))
    stop = full[12:15]
    engine = Engine(model, tok, slots=2)
    by_text, rec_text = request(prompt, 30, stop_strings=(stop,))
    stop_id = generate(model, prompt, 30, temperature=0)[5]
    by_id, rec_id = request(prompt, 30, stop_ids=(stop_id,))
    run(engine, {0: [by_text, by_id]})
    assert rec_text.text == full[:full.index(stop)]
    assert rec_text.done.finish_reason == "stop"
    ids = generate(model, prompt, 30, temperature=0)
    assert rec_id.tokens == ids[:ids.index(stop_id)]
    assert rec_id.done.finish_reason == "stop"


def test_streamed_text_never_splits_a_character():
    text = "héllo wörld ünïcödé ñ 日本語 " * 20
    tok = Tokenizer.train([text], vocab_size=270)  # bytes plus a few merges: é is two tokens
    model = tiny_model(tok.vocab_size)
    engine = Engine(model, tok, slots=2)
    reqs = [request(tok.encode("日本"), 60, sampling=SamplingConfig(temperature=1.5), seed=s)
            for s in range(2)]
    run(engine, {0: [r for r, _ in reqs]})
    for _, rec in reqs:
        assert rec.text == tok.decode(rec.tokens)  # pieces joined = the whole decode


def test_cancel_frees_the_slot_and_the_queue_is_bounded(tok):
    model = tiny_model(tok.vocab_size)
    engine = Engine(model, tok, slots=1, max_queue=1)
    (a, rec_a), (b, rec_b), (c, _) = (request([1, 2, 3], 50) for _ in range(3))
    engine.submit(a, b)  # one for the free slot, one waiting
    with pytest.raises(QueueFull):
        engine.submit(c)
    for _ in range(3):
        engine.step()
    # The first step prefills (one token) and decodes (another).
    assert engine.stats()["active"] == 1 and len(rec_a.tokens) == 4 and not rec_b.tokens
    engine.cancel(a)
    engine.step()
    assert rec_a.done.finish_reason == "cancelled" and len(rec_a.tokens) == 4
    assert len(rec_b.tokens) == 2  # admitted in the same step: prefill + one decode
    engine.cancel(b)
    engine.step()
    assert engine.stats()["active"] == 0 and engine._col == 0


def test_bad_requests_are_user_errors(tok):
    engine = Engine(tiny_model(tok.vocab_size), tok)
    for prompt, max_tokens, words in (([], 5, "empty"), ([1] * CONTEXT, 5, "shorten"),
                                      ([tok.vocab_size], 5, "token ids"), ([1], 0, "max_tokens")):
        with pytest.raises(UserError, match=words):
            engine.submit(Request(prompt, max_tokens))


def test_background_thread_serves_many_threads(tok):
    model = tiny_model(tok.vocab_size)
    engine = Engine(model, tok, slots=4).start()
    try:
        prompts = prompts_of([4, 11, 7, 25, 2, 16], tok.vocab_size)
        results: list[list[int]] = [[] for _ in prompts]
        finished = [threading.Event() for _ in prompts]

        def emit(i, event):
            if isinstance(event, Done):
                finished[i].set()
            else:
                results[i].append(event.token)

        def client(i):
            engine.submit(Request(prompts[i], 20, emit=lambda e, i=i: emit(i, e)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for event in finished:
            assert event.wait(60)
        for prompt, tokens in zip(prompts, results, strict=True):
            assert tokens == generate(model, prompt, 20, temperature=0)
    finally:
        engine.stop()
