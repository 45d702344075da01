"""Beam search: keep the num_beams best partial sequences by summed log-probability.

A sequence's score is its summed log-probability divided by length ** length_penalty, where
length counts its generated tokens (a final stop token included). Each step expands every beam
over the whole vocabulary and keeps the 2 * num_beams best candidates: those ending in a stop
token (or text) become finished hypotheses, the best num_beams of the rest go on. Search ends
at max_new_tokens, or early: with early_stopping once num_beams hypotheses are finished,
otherwise once no running beam can still beat the worst of the num_beams best finished ones
(an exact bound, since log-probabilities are <= 0). Temperature does not change beam search;
the penalties do.

One implementation serves both model kinds: the search drives a decoding window (prefill,
append, next_logits, reorder). For a GPT that is generate.engine.Window and the prompt is
continued; for an encoder-decoder (`model.is_encoder_decoder`) it is the model's DecodeState and
the prompt is the source, encoded once for all beams, with the penalties counting only the
generated target tokens.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from scratchllm.generate.config import Completion, GenerationConfig
from scratchllm.generate.engine import Window, fit_prompt
from scratchllm.generate.sampling import History, apply_penalties
from scratchllm.generate.text import TextStream
from scratchllm.tokenizer import BaseTokenizer


class Hypotheses:
    """The best `size` finished sequences, as (score, ids, finish_reason)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[float, list[int], str]] = []

    def add(self, score: float, ids: list[int], reason: str) -> None:
        """Keep the hypothesis if it is among the `size` best."""
        self.items.append((score, ids, reason))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size:]

    @property
    def full(self) -> bool:
        """True once `size` hypotheses are kept."""
        return len(self.items) >= self.size

    def worst(self) -> float:
        """The lowest kept score (-inf while not full)."""
        return self.items[-1][0] if self.full else -math.inf


def best_possible(sum_logprob: float, length: int, max_length: int, length_penalty: float
                  ) -> float:
    """The highest score a running beam can still reach (its log-probability only falls)."""
    if length >= max_length:
        return sum_logprob / length ** length_penalty
    # s <= 0: with a positive penalty the longest finish scores best, else the shortest.
    best_length = max_length if length_penalty > 0 else length + 1
    return sum_logprob / best_length ** length_penalty


@torch.inference_mode()
def beam_search(model: nn.Module, prompt: list[int], cfg: GenerationConfig,
                tokenizer: BaseTokenizer | None = None) -> Completion:
    """The highest-scoring continuation of one prompt (for an encoder-decoder model: the best
    target for one source) found by beam search."""
    t0 = time.perf_counter()
    seq2seq = getattr(model, "is_encoder_decoder", False)
    if not seq2seq:
        prompt = fit_prompt(prompt, model, cfg.truncate_prompt)
    result = Completion(prompt_ids=list(prompt))
    K, N, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    if N == 0:
        result.text = "" if tokenizer is not None else None
        return result
    was_training = model.training
    model.eval()
    try:
        if seq2seq:  # the source is encoded once; every beam starts from the decoder's bos
            window = model.start_decoding([prompt], N, copies=K, use_cache=cfg.use_cache)
        else:
            window = Window(model, [prompt] * K, N, cfg)
        device = window.tokens.device
        seen = [] if seq2seq else prompt  # what the penalties count besides the new tokens
        history = History([seen] * K, model.config.vocab_size, device) \
            if cfg.has_penalties else None
        scores = torch.full((K,), -math.inf, device=device)
        scores[0] = 0.0  # all beams start identical: expand only the first
        beams: list[list[int]] = [[] for _ in range(K)]
        finished = Hypotheses(K)
        stop_ids, stops = set(cfg.stop_ids), cfg.stop_strings if tokenizer is not None else ()
        reason = "length"
        logits = window.prefill()  # (K, V)
        for step in range(N):
            length = step + 1
            logp = torch.log_softmax(apply_penalties(logits.float(), cfg, history), dim=-1)
            V = logp.shape[-1]
            candidates = (scores[:, None] + logp).view(-1)  # (K * V,)
            top, index = torch.topk(candidates, min(2 * K, candidates.numel()))
            keep_rows, keep_tokens, keep_scores = [], [], []
            for score, idx in zip(top.tolist(), index.tolist(), strict=True):
                if score == -math.inf or len(keep_rows) == K:
                    break
                row, token = divmod(idx, V)
                if token in stop_ids:  # finished: its score is final
                    finished.add(score / length ** lp, beams[row], "stop")
                else:
                    keep_rows.append(row)
                    keep_tokens.append(token)
                    keep_scores.append(score)
            if not keep_rows:  # every surviving candidate has finished
                scores.fill_(-math.inf)
                break
            if tokenizer is not None and stops:  # a beam whose text holds a stop string ends
                for j, (row, token) in enumerate(zip(keep_rows, keep_tokens, strict=True)):
                    text = tokenizer.decode([*beams[row], token])
                    if any(s in text for s in stops):
                        finished.add(keep_scores[j] / length ** lp, [*beams[row], token], "stop")
                        keep_scores[j] = -math.inf
            while len(keep_rows) < K:  # fixed shapes: pad with dead copies
                keep_rows.append(keep_rows[0])
                keep_tokens.append(keep_tokens[0])
                keep_scores.append(-math.inf)
            rows = torch.tensor(keep_rows, device=device)
            tokens = torch.tensor(keep_tokens, device=device)
            window.reorder(rows)
            window.append(tokens)
            if history is not None:
                history.reorder(rows)
                history.add(tokens)
            beams = [[*beams[r], t] for r, t in zip(keep_rows, keep_tokens, strict=True)]
            scores = torch.tensor(keep_scores, device=device)
            best_running = max(keep_scores)
            if best_running == -math.inf:
                break
            if finished.full and (cfg.early_stopping or best_possible(
                    best_running, length, N, lp) <= finished.worst()):
                break
            if step == N - 1:
                break
            logits = window.next_logits()
            if logits is None:
                reason = "context"
                break
        length = len(beams[0])
        for score, ids in zip(scores.tolist(), beams, strict=True):
            if score > -math.inf:
                finished.add(score / max(length, 1) ** lp, ids, reason)
        result.score, result.ids, result.finish_reason = finished.items[0]
        ids = result.ids
        if tokenizer is not None:  # cut the text (and the ids) before any stop string
            text = TextStream(tokenizer, stops)
            for token in ids:
                text.push(token)
            text.flush()
            result.ids, result.text = ids[:text.kept_tokens()], text.final_text()
        result.time_to_first_token_s = result.total_s = time.perf_counter() - t0
        return result
    finally:
        model.train(was_training)
