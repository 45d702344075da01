"""Continuous batching: many requests share every decode step of one batched KV cache.

A fixed number of slots share one cache per layer, (slots, kv_heads, width, head_dim). Every
active sequence writes its next key/value at the same column `col` (the model's cache takes one
`input_pos` for the whole batch), so the sequences are right-aligned: one of `length` tokens
holds columns col - length .. col - 1, and an attention mask hides the columns before it (left
by an earlier occupant of the slot). Its own `positions` (its length) make it compute exactly
what it would alone. A decode step runs one forward over the active rows only, reading only the
columns in use (views of the big buffers).

Between steps, new requests are prefilled together (their own cache, the prompts left-padded
to the longest) and each one's keys and values copied into a free row, ending at `col` (all
rows move right first when a prompt is longer than `col`); finished or cancelled ones leave,
the last row moving into the freed one. When `col` reaches the end of the buffer, all rows move
left by what none of them uses (or the buffer doubles, up to the context). A request never
outgrows the context: prompt + max_tokens <= context_length, so after moving left there is
always a free column.

The engine runs in one background thread (`start`); `submit` and `cancel` may be called from
any thread, and each request reports through its `emit` callback, called in the engine thread
in bursts (after the admissions, after the decode step), each burst followed by `flush`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import torch
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.generate.engine import make_generator, model_device
from scratchllm.generate.sampling import History, SamplingConfig, sample_next
from scratchllm.generate.text import TextStream
from scratchllm.model.cache import KVCache
from scratchllm.tokenizer import BaseTokenizer

COLUMN_STEP = 16  # attention reads the columns in use rounded up to this (fewer cached views)
MIN_WIDTH = 64  # the cache buffer's first width; it doubles up to the context length


class QueueFull(Exception):
    """The waiting queue is full: the caller should answer 429 and let the client retry."""


@dataclass
class Delta:
    """New output of one request: safe text (may be '' while a character is pending) and the
    token behind it, with its log-probability and the likeliest alternatives when asked."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Done:
    """A request ended: stop | length | cancelled | error; token counts for `usage`."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Done


def _ignore(event: Event) -> None:
    pass


@dataclass(eq=False)
class Request:
    """One sequence to generate. `emit` receives its events in the engine's thread."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k likeliest
    emit: Callable[[Event], None] = _ignore
    cancelled: bool = False  # set through Engine.cancel; the engine drops it before a step


class _Seq:
    """An admitted request: its decoding state and its row's place in the cache."""

    def __init__(self, req: Request, tokenizer: BaseTokenizer, context: int, vocab: int,
                 device: torch.device) -> None:
        self.req = req
        self.max_tokens = min(req.max_tokens, context - len(req.prompt))
        self.text = TextStream(tokenizer, req.stop_strings)
        self.generator = make_generator(req.seed, device)
        self.history = History([req.prompt], vocab, device) if req.sampling.has_penalties \
            else None
        self.plain_greedy = req.sampling.greedy and self.history is None
        self.key = astuple(req.sampling)  # rows with equal keys sample in one batch
        self.stop_ids = frozenset(req.stop_ids)
        self.length = len(req.prompt)  # tokens in the cache
        self.generated = 0  # tokens sampled (a stop token included): usage's count
        self.next_token = -1  # sampled, to be fed at the next step


class _View(KVCache):
    """A KVCache over part of a bigger one (the active rows, the columns in use): writes go
    through to the big buffers."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        nn.Module.__init__(self)
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)


class Engine:
    """A continuous-batching decoder over `slots` rows of one KV cache, with a bounded queue."""

    def __init__(self, model: nn.Module, tokenizer: BaseTokenizer, slots: int = 8,
                 max_queue: int = 64, prefill_tokens: int | None = None) -> None:
        if slots < 1 or max_queue < 0:
            raise UserError(f"slots must be >= 1 and max_queue >= 0, got {slots}, {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.slots, self.max_queue = slots, max_queue
        self.context = model.config.context_length
        self.vocab = model.config.vocab_size
        # Prompt tokens prefilled per step at most (at least one request): a burst of new
        # requests delays the running ones by a bounded amount.
        self.prefill_tokens = prefill_tokens or self.context
        self.device = model_device(model)
        self._arange = torch.arange(self.context, device=self.device)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._rows: list[_Seq] = []
        self._col = 0  # the next column every row writes
        self._width = 0
        self._buffers: list[Tensor] = []  # k and v of every layer, (slots, kv_heads, width, hd)
        self._views: dict[tuple[int, int], nn.ModuleList] = {}
        self._prefilling: list[Request] = []  # taken from the queue, being prefilled
        self._outbox: list[tuple[Request, Event]] = []  # events to deliver after this phase
        # Called after each burst of events (in the engine's thread): a listener in another
        # thread hands them over in one go (the server wakes its event loop once per burst).
        self.flush: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps run
        self.tokens = 0  # tokens generated
        self.cancellations = 0  # requests that ended cancelled

    # ---- any thread ---------------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Raise UserError when the request cannot run (empty, bad ids, no room to generate)."""
        ids = req.prompt
        if not ids:
            raise UserError("the prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise UserError(f"prompt token ids must be in 0..{self.vocab - 1}")
        if len(ids) >= self.context:
            raise UserError(f"the prompt has {len(ids)} tokens but the model reads at most "
                            f"{self.context} (prompt and reply together): shorten it")
        if req.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {req.max_tokens}")

    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none); QueueFull when the queue has no room for them."""
        for req in requests:
            self.check(req)
        with self._cond:
            if len(self._waiting) + len(requests) > self.max_queue + self._free_slots():
                raise QueueFull(f"{len(self._waiting)} requests are waiting (at most "
                                f"{self.max_queue}): retry shortly")
            self._waiting.extend(requests)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Stop a request (queued or running); its slot is free before the next step."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Slots, active rows, waiting requests; decode steps, tokens, cancellations so far."""
        with self._cond:
            return {"slots": self.slots, "active": len(self._rows),
                    "waiting": len(self._waiting), "max_queue": self.max_queue,
                    "steps": self.steps, "tokens": self.tokens,
                    "cancelled": self.cancellations}

    def start(self) -> Engine:
        """Run the engine in a background thread (until stop)."""
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="scratchllm-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread; requests still queued or running end as cancelled."""
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            self._done(req, "cancelled", 0)
        for seq in self._rows:
            self._done(seq.req, "cancelled", seq.generated)
        self._deliver()
        self._reset()

    def _free_slots(self) -> int:
        return self.slots - len(self._rows)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._rows and not self._waiting:
                    self._cond.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail what is in flight, go on
                failed = [seq.req for seq in self._rows] + self._prefilling
                for req in failed:
                    self._done(req, "error", 0, f"{type(e).__name__}: {e}")
                self._deliver()
                self._reset()

    # ---- the engine's thread ------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones into free slots, then decode one token
        for every active row. Call it from one thread only (start() runs it in a loop).

        Events reach the listeners in two bursts, after the admissions and after the decode
        step, not one by one amid the work: a listener in another thread (the server's event
        loop) is woken once per burst and does not contend for the GIL meanwhile."""
        try:
            self._leave([i for i, seq in enumerate(self._rows) if seq.req.cancelled],
                        "cancelled")
            self._admit()
            self._deliver()
            if self._rows:
                self._decode()
        finally:
            self._deliver()

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, together: as many as fit, their prompts
        left-padded to the longest within prefill_tokens (at least one request)."""
        while True:
            with self._cond:
                if not self._waiting or len(self._rows) + len(self._prefilling) >= self.slots:
                    break
                req = self._waiting[0]
                longest = max([len(req.prompt), *(len(r.prompt) for r in self._prefilling)])
                if self._prefilling and \
                        longest * (len(self._prefilling) + 1) > self.prefill_tokens:
                    break
                self._waiting.popleft()
            if req.cancelled:
                self._done(req, "cancelled", 0)
            else:
                self._prefilling.append(req)
        if self._prefilling:
            self._prefill(self._prefilling)
            self._prefilling = []

    def _prefill(self, reqs: list[Request]) -> None:
        """Read the prompts in one forward (left-padded: a mask hides the padding and each row
        counts its own positions, so it computes what it would alone), sample their first
        tokens, and give each request a row unless it ended."""
        seqs = [_Seq(req, self.tokenizer, self.context, self.vocab, self.device) for req in reqs]
        L = max(seq.length for seq in seqs)
        x = torch.zeros(len(reqs), L, dtype=torch.long, device=self.device)
        keep = torch.ones(len(reqs), L, dtype=torch.bool, device=self.device)
        for i, req in enumerate(reqs):
            x[i, L - len(req.prompt):] = torch.tensor(req.prompt, device=self.device)
            keep[i, :L - len(req.prompt)] = False
        cache = self.model.make_cache(len(reqs), L)
        logits = self.model(x, cache=cache, input_pos=self._arange[:L], logits_to_keep=1,
                            attention_mask=None if keep.all() else keep)
        ended = set(self._choose(seqs, logits[:, -1]))
        staying = [i for i in range(len(seqs)) if i not in ended]
        if not staying:
            return
        longest = max(seqs[i].length for i in staying)
        if self._col < longest:  # every row moves right so that the prompts fit before col
            self._ensure_width(longest + 1)
            self._move(longest)
        self._ensure_width(self._col + 1)
        col = self._col
        for i in staying:
            row, n = len(self._rows), seqs[i].length
            for buffer, layer in zip(self._buffers, _kv(cache), strict=True):
                buffer[row, :, col - n:col] = layer[i, :, L - n:]
            self._rows.append(seqs[i])

    def _decode(self) -> None:
        """One token for every active row: one forward over all of them."""
        self._make_room()
        rows, col = self._rows, self._col
        n = len(rows)
        width = min(self._width, -(-(col + 1) // COLUMN_STEP) * COLUMN_STEP)
        lengths = torch.tensor([seq.length for seq in rows], device=self.device)  # (n,)
        keep = self._arange[None, :width] >= (col - lengths)[:, None]  # (n, width) own columns
        x = torch.tensor([[seq.next_token] for seq in rows], device=self.device)  # (n, 1)
        logits = self.model(x, cache=self._view(n, width), input_pos=self._arange[col:col + 1],
                            attention_mask=keep, positions=lengths[:, None])  # (n, 1, V)
        self._col += 1
        for seq in rows:
            seq.length += 1
        self.steps += 1
        ended = self._choose(rows, logits[:, -1])
        self._leave(ended, None)

    def _choose(self, seqs: list[_Seq], logits: Tensor) -> list[int]:
        """Sample one token per sequence from logits (n, V), report it; the indices that ended."""
        logits = logits.float()
        tokens = self._sample(seqs, logits)
        want_logprobs = any(s.req.logprobs is not None for s in seqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        ended = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.history is not None:
                seq.history.add(torch.tensor([token], device=self.device))
            delta = Delta("", token)
            if logprobs is not None and seq.req.logprobs is not None:
                delta.logprob = float(logprobs[i, token])
                values, ids = logprobs[i].topk(min(seq.req.logprobs, self.vocab))
                delta.top = list(zip(ids.tolist(), values.tolist(), strict=True))
            if self._accept(seq, token, delta):
                ended.append(i)
        return ended

    def _sample(self, seqs: list[_Seq], logits: Tensor) -> list[int]:
        """The next token of every row of logits (n, V).

        Rows with the same settings share each tensor op (greedy rows one argmax; sampled rows
        one sample_next: one temperature, filter, softmax and inverse-CDF draw). A seeded row
        takes its uniform number from its own generator: the same token as alone. A row with
        penalties reads its own history: it goes alone."""
        groups: dict[object, list[int]] = {}
        for i, seq in enumerate(seqs):
            key = "greedy" if seq.plain_greedy else i if seq.history is not None else \
                (seq.key, seq.generator is None)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:  # the usual case: every row alike
            return self._sample_group(seqs, logits, list(range(len(seqs)))).tolist()
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = self._sample_group(seqs, logits.index_select(0, index), rows)
        return tokens.tolist()

    def _sample_group(self, seqs: list[_Seq], logits: Tensor, rows: list[int]) -> Tensor:
        """Tokens (len(rows),) for the rows' logits, the rows sampling alike."""
        first = seqs[rows[0]]
        if first.plain_greedy:
            return logits.argmax(-1)
        # history: a group of one; unseeded rows draw from torch's global RNG
        generators = None if first.generator is None else [seqs[i].generator for i in rows]
        return sample_next(logits, first.history, first.req.sampling, generators)

    def _accept(self, seq: _Seq, token: int, delta: Delta) -> bool:
        """Record a sampled token and emit its text; True when the sequence ended."""
        seq.generated += 1
        self.tokens += 1
        if token in seq.stop_ids:  # not part of the reply: no text, no Delta
            self._done(seq.req, "stop", seq.generated)
            return True
        delta.text = seq.text.push(token)
        reason = "stop" if seq.text.stopped else \
            "length" if seq.generated >= seq.max_tokens else None
        if reason == "length":
            delta.text += seq.text.flush()
        self._emit(seq.req, delta)
        if reason is not None:
            self._done(seq.req, reason, seq.generated)
            return True
        seq.next_token = token
        return False

    def _leave(self, indices: list[int], reason: str | None) -> None:
        """Free the rows at `indices` (ending them with `reason` unless None)."""
        for i in sorted(indices, reverse=True):  # the last row moves into each freed one
            seq, last = self._rows[i], len(self._rows) - 1
            if reason is not None:
                self._done(seq.req, reason, seq.generated)
            if i != last:
                for buffer in self._buffers:
                    buffer[i] = buffer[last]
                self._rows[i] = self._rows[last]
            self._rows.pop()
        if not self._rows:
            self._col = 0
        elif indices:
            span = max(seq.length for seq in self._rows)
            if self._col - span >= max(MIN_WIDTH, self._col // 2):  # much unused: read less
                self._move(span)

    # ---- the cache buffers --------------------------------------------------------------------

    def _ensure_width(self, needed: int) -> None:
        """Buffers at least `needed` columns wide (doubling from MIN_WIDTH, up to the context)."""
        if needed <= self._width:
            return
        width = max(MIN_WIDTH, self._width)
        while width < needed:
            width *= 2
        width = min(width, self.context)
        new = _kv(self.model.make_cache(self.slots, width))
        for old, buffer in zip(self._buffers, new, strict=False):
            buffer[:, :, :self._width] = old
        self._buffers, self._width, self._views = new, width, {}

    def _make_room(self) -> None:
        """A free column at `col` for this step: move the rows left, or widen the buffers."""
        if self._col < self._width:
            return
        span = max(seq.length for seq in self._rows)
        unused = self._col - span
        if self._width < self.context and unused < self._width // 4:
            self._ensure_width(self._col + 1)
        else:
            self._move(span)

    def _move(self, new_col: int) -> None:
        """Shift every row's columns so that they end at new_col instead of col."""
        n, col = len(self._rows), self._col
        span = max((seq.length for seq in self._rows), default=0)
        if n and span and new_col != col:
            for buffer in self._buffers:
                buffer[:n, :, new_col - span:new_col] = buffer[:n, :, col - span:col].clone()
        self._col = new_col

    def _view(self, n: int, width: int) -> nn.ModuleList:
        """Caches over the first n rows and `width` columns (kept for reuse)."""
        key = (n, width)
        if key not in self._views:
            pairs = zip(self._buffers[::2], self._buffers[1::2], strict=True)
            self._views[key] = nn.ModuleList(_View(k[:n, :, :width], v[:n, :, :width])
                                             for k, v in pairs)
        return self._views[key]

    def _reset(self) -> None:
        self._rows, self._col, self._prefilling = [], 0, []

    # ---- reporting ----------------------------------------------------------------------------

    def _emit(self, req: Request, event: Event) -> None:
        self._outbox.append((req, event))

    def _deliver(self) -> None:
        """Call the listeners of the events emitted so far, in order, then `flush`."""
        if not self._outbox:
            return
        events, self._outbox = self._outbox, []
        for req, event in events:
            try:
                req.emit(event)
            except Exception:  # the listener is gone (e.g. the server is shutting down): stop it
                req.cancelled = True
        if self.flush is not None:
            try:
                self.flush()
            except Exception:  # as above, for every request of the burst
                for req, _ in events:
                    req.cancelled = True

    def _done(self, req: Request, reason: str, generated: int, error: str | None = None) -> None:
        self.cancellations += reason == "cancelled"
        self._emit(req, Done(reason, len(req.prompt), generated, error))


def _kv(caches: nn.ModuleList) -> list[Tensor]:
    """The k and v buffers of every layer, in order: k0, v0, k1, v1, ..."""
    return [t for cache in caches for t in (cache.k, cache.v)]
