"""The decoding engine: prefill the prompts once, then one token per step against the KV cache.

A batch holds prompts of different lengths left-padded to the longest, with an attention mask
(positions count real tokens only, so every row sees exactly what it would see alone). A decode
step feeds one token per row at a slot sliced from a precomputed `arange`, with the same
(B, slots) view of the mask. Attention reads every slot of the cache, so the cache holds the
slots written so far rounded up to 64, growing by 64 when full (a copy every 64 tokens).
Rows stop on their own (stop id or stop string); the batch ends when all have.

Context policy: a prompt longer than context_length is an error unless truncate_prompt keeps
its last context_length tokens. When prompt + generated tokens outgrow the context, "slide"
(the default) drops the oldest tokens and re-prefills the last context_length - slide_tokens
(slide_tokens = context_length // 4 by default) into the cache, then decodes on: one prefill
every slide_tokens tokens instead of a full recomputation per token. "stop" ends the sequence
with finish_reason "context" instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.generate.config import Completion, GenerationConfig
from scratchllm.generate.sampling import History, sample_next
from scratchllm.generate.text import TextStream
from scratchllm.tokenizer import BaseTokenizer

# The KV cache grows in steps of this many slots. Attention reads every slot, and a cache that
# doubles instead is up to twice what is written: GPT-2 small, 500 tokens, bf16, growing by 64
# decodes 1.06x faster at batch 1 and 1.14x at batch 8 (the copies cost less than the reads). The
# slots must be whole buffers: attention on a view of a longer one is 1.3-4x slower (strided).
CACHE_STEP = 64


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights."""
    return next(model.parameters()).device


def fit_prompt(ids: list[int], model: nn.Module, truncate: bool) -> list[int]:
    """Check a prompt against the vocabulary and context; keep its tail when truncating."""
    cfg = model.config
    ids = [int(i) for i in ids]
    if not ids:
        raise UserError("the prompt is empty: give at least one token (e.g. the tokenizer's "
                        "<|endoftext|> id)")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise UserError(f"prompt token ids must be in 0..{cfg.vocab_size - 1}, got "
                        f"{min(ids)}..{max(ids)}: use the tokenizer the model was trained with")
    if len(ids) > cfg.context_length:
        if not truncate:
            raise UserError(f"the prompt has {len(ids)} tokens but the model reads at most "
                            f"{cfg.context_length}: shorten it or truncate it from the left "
                            "(truncate_prompt=True, --truncate-prompt)")
        ids = ids[-cfg.context_length:]
    return ids


class Window:
    """The tokens the model reads, from column `start` of a (B, width) buffer to column `n`.

    With the cache, slot j holds column start + j; without it, the window is recomputed each
    step (the slow reference). Sliding moves `start` and re-prefills the cache.
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 cfg: GenerationConfig) -> None:
        self.model, self.cfg = model, cfg
        device = model_device(model)
        C = self.context = model.config.context_length
        B, L = len(prompts), max(len(p) for p in prompts)
        width = L + max_new_tokens
        self.tokens = torch.zeros(B, width, dtype=torch.long, device=device)  # prompt + new
        # 1 = real token. Columns past the end stay 1: the causal mask hides unwritten slots.
        mask = torch.ones(B, width + C, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            self.tokens[row, L - len(ids):L] = torch.tensor(ids, device=device)
            mask[row, :L - len(ids)] = False
        self.mask = mask if any(len(p) < L for p in prompts) else None  # None: cheaper forward
        self.start, self.n = 0, L  # window = columns start .. n-1
        self.max_slots = min(C, width - 1)  # every token but the last is fed back
        self.slot_pos = torch.arange(self.max_slots, device=device)  # input_pos slices
        self.slots = self._bucket(L)
        self.caches = model.make_cache(B, self.slots) if cfg.use_cache else None
        self.after_slide = max(1, C - (cfg.slide_tokens or max(1, C // 4)))  # window length

    def _bucket(self, needed: int) -> int:
        """Cache size for `needed` slots: a multiple of CACHE_STEP, at most max_slots."""
        return min(-(-needed // CACHE_STEP) * CACHE_STEP, self.max_slots)

    def _grow(self, needed: int) -> None:
        """Make room for `needed` slots: move the cache into a larger one (see CACHE_STEP)."""
        if self.caches is None or needed <= self.slots:
            return
        slots = self._bucket(needed)
        caches = self.model.make_cache(self.tokens.shape[0], slots)
        for old, new in zip(self.caches, caches, strict=True):
            new.k[:, :, :self.slots] = old.k
            new.v[:, :, :self.slots] = old.v
        self.caches, self.slots = caches, slots

    def _mask(self, length: int) -> Tensor | None:
        return None if self.mask is None else self.mask[:, self.start:self.start + length]

    def prefill(self) -> Tensor:
        """Logits (B, V) after reading the whole window (the prompt, or the tail after a slide)."""
        T = self.n - self.start
        x = self.tokens[:, self.start:self.n]  # (B, T)
        if self.caches is None:
            return self.model(x, attention_mask=self._mask(T), logits_to_keep=1)[:, -1]
        self._grow(T)
        # logits_to_keep=1: only the last position's logits are needed, not T rows of them.
        logits = self.model(x, cache=self.caches, input_pos=self.slot_pos[:T],
                            attention_mask=self._mask(self.slots), logits_to_keep=1)
        return logits[:, -1]

    def append(self, tokens: Tensor) -> None:
        """Write one new token per row, tokens (B,), at column n."""
        self.tokens[:, self.n] = tokens
        self.n += 1

    def next_logits(self) -> Tensor | None:
        """Logits (B, V) for the next token, or None when the context is full and policy is stop."""
        if self.n - self.start > self.context:
            if self.cfg.context_policy == "stop":
                return None
            self.start = self.n - self.after_slide  # drop the oldest tokens, re-read the rest
            return self.prefill()
        if self.caches is None:
            return self.prefill()
        slot = self.n - 1 - self.start
        self._grow(slot + 1)
        logits = self.model(self.tokens[:, self.n - 1:self.n], cache=self.caches,
                            input_pos=self.slot_pos[slot:slot + 1],
                            attention_mask=self._mask(self.slots))
        return logits[:, -1]

    def reorder(self, rows: Tensor) -> None:
        """Keep rows (beams) in the given order: tokens and cached keys/values."""
        self.tokens = self.tokens[rows]
        if self.mask is not None:
            self.mask = self.mask[rows]
        for cache in self.caches or ():
            cache.k.copy_(cache.k[rows])
            cache.v.copy_(cache.v[rows])


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator for seeded sampling (None: torch's global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.inference_mode()
def sample_stream(model: nn.Module, prompts: list[list[int]], cfg: GenerationConfig,
                  tokenizer: BaseTokenizer | None = None,
                  out: list[Completion] | None = None) -> Iterator[list[str]]:
    """Sample (or greedy-decode) a batch; yields each step's new safe text per row.

    `out` receives one Completion per prompt, complete when the iterator is exhausted.
    """
    if cfg.stop_strings and tokenizer is None:
        raise UserError("stop strings need the tokenizer: pass tokenizer=...")
    t0 = time.perf_counter()
    prompts = [fit_prompt(p, model, cfg.truncate_prompt) for p in prompts]
    rows = [Completion(prompt_ids=p) for p in prompts]
    if out is not None:
        out.extend(rows)
    if cfg.max_new_tokens == 0:
        for row in rows:
            row.text = "" if tokenizer is not None else None
        return
    was_training = model.training
    model.eval()  # no dropout: it would also draw from the global RNG
    try:
        window = Window(model, prompts, cfg.max_new_tokens, cfg)
        device = window.tokens.device
        generator = make_generator(cfg.seed, device)
        history = History(prompts, model.config.vocab_size, device) if cfg.has_penalties \
            else None
        texts = [TextStream(tokenizer, cfg.stop_strings) if tokenizer is not None else None
                 for _ in rows]
        stop_ids, live = set(cfg.stop_ids), set(range(len(rows)))
        logits = window.prefill()  # (B, V)
        for step in range(cfg.max_new_tokens):
            tokens = sample_next(logits, history, cfg, generator)  # (B,)
            window.append(tokens)
            if history is not None:
                history.add(tokens)
            deltas = _accept(tokens.tolist(), rows, texts, live, stop_ids)
            if step == 0:
                for row in rows:
                    row.time_to_first_token_s = time.perf_counter() - t0
            yield deltas
            if not live or step == cfg.max_new_tokens - 1:
                break
            logits = window.next_logits()
            if logits is None:
                for i in live:
                    rows[i].finish_reason = "context"
                break
        tails = [text.flush() if text is not None else "" for text in texts]
        if any(tails):
            yield tails
        for row, text in zip(rows, texts, strict=True):
            if text is not None:
                del row.ids[text.kept_tokens():]  # tokens that overlap a stop string
                row.text = text.final_text()
            row.total_s = time.perf_counter() - t0
    finally:
        model.train(was_training)


def _accept(tokens: list[int], rows: list[Completion], texts: list[TextStream | None],
            live: set[int], stop_ids: set[int]) -> list[str]:
    """Record one sampled token per row; end rows that hit a stop; return the new text."""
    deltas = [""] * len(rows)
    for i, token in enumerate(tokens):
        if i not in live:
            continue  # finished rows keep computing (same shapes) but are ignored
        if token in stop_ids:
            rows[i].finish_reason = "stop"
            live.discard(i)
            continue
        rows[i].ids.append(token)
        if texts[i] is not None:
            deltas[i] = texts[i].push(token)
            if texts[i].stopped:
                rows[i].finish_reason = "stop"
                live.discard(i)
    return deltas
