"""`scratchllm chat`: an interactive terminal chat with an instruction-tuned checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError

DESCRIPTION = """Chat with a checkpoint (or a run directory: its newest checkpoint) in the
terminal. Replies stream as they are generated and always end at the template's end-of-turn
token. The conversation is kept; when it no longer fits the context (with room for
--max-new-tokens) the oldest turns are dropped, with a note. Commands: /reset (forget the
conversation), /system TEXT (set the system message; /system alone clears it), /exit (or
Ctrl-D). Ctrl-C stops a reply being written; at the prompt it exits. --prompt TEXT answers once,
prints only the reply and exits. The template comes from the checkpoint's template.json, else
--template. The alpaca template holds one instruction and its response: each reply sees only
the latest message (no history, no system message)."""

PROMPT = "you> "
REPLY = "assistant> "


def register(commands: Any) -> argparse.ArgumentParser:
    """Add `scratchllm chat` to an argparse subparsers object; returns its parser."""
    p = commands.add_parser("chat", help="chat with an instruction-tuned checkpoint",
                            description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint directory or run directory")
    p.add_argument("--template", help="chat or alpaca (default: the checkpoint's template.json)")
    p.add_argument("--system", help="system message at the start of the conversation")
    p.add_argument("--prompt", help="answer this one message, print the reply and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus: smallest set with prob. P")
    p.add_argument("--seed", type=int, help="make sampling reproducible (reply i uses seed+i)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: auto)")
    p.add_argument("--dtype", default="float32",
                   choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and KV cache (default float32)")
    p.set_defaults(handler=cmd_chat)
    return p


def _load(path: Path, device: str, dtype: str) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, saved template name or None); the library loader when it exists."""
    try:
        from scratchllm.finetune.instruct import load_chat_model
    except ImportError:
        load_chat_model = None
    if load_chat_model is not None:
        return load_chat_model(path, device, dtype)
    from scratchllm.checkpoint import find_checkpoint, load_for_inference

    checkpoint = find_checkpoint(path)
    model, tokenizer = load_for_inference(checkpoint, device, dtype)
    template_file = checkpoint / "template.json"
    template = None
    if template_file.is_file():
        try:
            template = json.loads(template_file.read_text(encoding="utf-8"))["template"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {template_file} ({e}): it should be "
                            '{"template": NAME}') from e
    return model, tokenizer, template


class ChatSession:
    """The conversation so far and how to prompt the model with it."""

    def __init__(self, model: Any, tokenizer: Any, template: Any, options: dict[str, Any],
                 system: str | None = None, note: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.options = options  # GenerationConfig fields except stop_ids and seed
        self.seed = options.pop("seed", None)
        self.system = system or None
        self.turns: list[dict[str, str]] = []  # alternating user / assistant, oldest first
        self.replies = 0
        self.note = note or (lambda text: print(text, file=sys.stderr, flush=True))
        specials = tokenizer.special_tokens
        # The end token, plus any other turn marker: a reply never runs on into a fake turn.
        self.stop_ids = tuple(specials[t] for t in dict.fromkeys(
            [template.end_token, *template.special_tokens, "<|endoftext|>"]) if t in specials)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def prompt_ids(self, user: str) -> list[int]:
        """Ids prompting the reply to `user`, dropping the oldest turns that no longer fit."""
        from scratchllm.data.chat import render_prompt

        context = self.model.config.context_length
        budget = context - self.options["max_new_tokens"]
        if self.template.name == "alpaca":  # one instruction: history cannot be expressed
            return self._check(render_prompt(self.template, [_user(user)], self.tokenizer))
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = [*self.turns, _user(user)]
        dropped = 0
        while True:
            ids = render_prompt(self.template, system + turns[dropped:], self.tokenizer)
            if len(ids) <= budget or dropped + 1 >= len(turns):
                break
            dropped += 2  # one user message and its reply
        if dropped:
            self.turns = self.turns[dropped:]
            self.note(f"[dropped the oldest {dropped // 2} exchange(s) to fit the "
                      f"{context}-token context]")
        return self._check(ids)

    def _check(self, ids: list[int]) -> list[int]:
        context = self.model.config.context_length
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
            self.turns += [_user(user), {"role": "assistant", "content": text}]
        return text


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    """Load the checkpoint and chat: once with --prompt, else interactively until /exit."""
    from scratchllm.data.chat import get_template

    if args.template is not None:
        get_template(args.template)  # a bad name fails before the model loads
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer, saved = _load(args.checkpoint, args.device, args.dtype)
    name = args.template or saved
    if name is None:
        raise UserError(f"{args.checkpoint} has no template.json (a base model?): pass "
                        "--template chat or --template alpaca")
    template = get_template(name)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    session = ChatSession(model, tokenizer, template, options, args.system)
    session.prompt_ids("")  # a tokenizer without the template's tokens fails now
    if args.prompt is not None:
        session.reply(args.prompt, _write)
        _write("\n")
        return 0
    return _interactive(session)


def _interactive(session: ChatSession) -> int:
    """The read-reply loop; /exit, Ctrl-D or Ctrl-C at the prompt end it with status 0."""
    import signal

    # Ctrl-C must raise KeyboardInterrupt even when started with SIGINT ignored (a background
    # job of a script inherits SIG_IGN, and Python then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"chatting with the {session.template.name} template: /reset, /system TEXT, /exit",
          flush=True)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("[conversation cleared]", flush=True)
        elif text == "/system" or text.startswith("/system "):
            session.system = text[len("/system"):].strip() or None
            ignored = " (the alpaca template ignores it)" if session.template.name == "alpaca" \
                else ""
            print(f"[system message {'set' if session.system else 'cleared'}{ignored}]",
                  flush=True)
        elif text.startswith("/"):
            print(f"[unknown command {text.split()[0]}: use /reset, /system TEXT or /exit]",
                  flush=True)
        else:
            try:
                session.reply(line, _write, REPLY)
            except UserError as e:
                _write(f"error: {e}")
            except KeyboardInterrupt:  # before the first token: nothing to keep
                _write(" [stopped]")
            _write("\n")
