"""Conversations: messages to prompt ids, the template's end tokens, and the terminal chat's
history (ChatSession), shared by `scratchllm chat` and the server."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from scratchllm.data.chat import Message, Template, render_prompt
from scratchllm.errors import UserError
from scratchllm.tokenizer import BaseTokenizer


def end_ids(template: Template, tokenizer: BaseTokenizer) -> tuple[int, ...]:
    """Ids that end a reply: the end token, plus any other turn marker and <|endoftext|>."""
    specials = tokenizer.special_tokens
    # A reply never runs on into a fake turn of the user's.
    names = dict.fromkeys([template.end_token, *template.special_tokens, "<|endoftext|>"])
    return tuple(specials[t] for t in names if t in specials)


def conversation_ids(template: Template, tokenizer: BaseTokenizer,
                     messages: Sequence[Message]) -> list[int]:
    """Ids prompting the next assistant reply to `messages` (OpenAI-style dicts).

    The alpaca template holds one instruction: it sees only the latest user message.
    """
    if template.name == "alpaca":
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise UserError("the conversation has no user message: add one")
        messages = [users[-1]]
    if not messages:
        raise UserError("the conversation is empty: give at least one message")
    return render_prompt(template, list(messages), tokenizer)


class ChatSession:
    """The conversation so far and how to prompt the model with it."""

    def __init__(self, model: Any, tokenizer: BaseTokenizer, template: Template,
                 options: dict[str, Any], system: str | None = None,
                 note: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.options = options  # GenerationConfig fields except stop_ids and seed
        self.seed = options.pop("seed", None)
        self.system = system or None
        self.turns: list[dict[str, str]] = []  # alternating user / assistant, oldest first
        self.replies = 0
        self.note = note or (lambda text: print(text, file=sys.stderr, flush=True))
        self.stop_ids = end_ids(template, tokenizer)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def prompt_ids(self, user: str) -> list[int]:
        """Ids prompting the reply to `user`, dropping the oldest turns that no longer fit."""
        context = self.model.config.context_length
        budget = context - self.options["max_new_tokens"]
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.template.name == "alpaca":  # one instruction: history cannot be expressed
            system = []
        turns = [*self.turns, user_message(user)]
        dropped = 0
        while True:
            ids = conversation_ids(self.template, self.tokenizer, system + turns[dropped:])
            if len(ids) <= budget or dropped + 1 >= len(turns) or self.template.name == "alpaca":
                break
            dropped += 2  # one user message and its reply
        if dropped:
            self.turns = self.turns[dropped:]
            self.note(f"[dropped the oldest {dropped // 2} exchange(s) to fit the "
                      f"{context}-token context]")
        if len(ids) >= context:
            raise UserError(f"the message makes a {len(ids)}-token prompt but the model reads at "
                            f"most {context}: shorten it (or the system message)")
        return ids

    def reply(self, user: str, write: Callable[[str], None], header: str = "") -> str:
        """Stream `header` and the reply to `user` through `write`; add the exchange to history.

        Ctrl-C (KeyboardInterrupt) stops the reply; what was written so far is kept.
        """
        from scratchllm.generate import GenerationConfig, stream

        ids = self.prompt_ids(user)
        seed = None if self.seed is None else self.seed + self.replies
        self.replies += 1
        config = GenerationConfig(**self.options, seed=seed, stop_ids=self.stop_ids)
        pieces: list[str] = []
        write(header)
        try:
            for piece in stream(self.model, self.tokenizer, ids, config=config):
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        text = "".join(pieces)
        if text.strip():  # an empty reply is not a turn the template can hold
            self.turns += [user_message(user), {"role": "assistant", "content": text}]
        return text


def user_message(text: str) -> dict[str, str]:
    """An OpenAI-style user message."""
    return {"role": "user", "content": text}
