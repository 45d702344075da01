"""`scratchllm chat`: an interactive terminal chat with an instruction-tuned checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from scratchllm.errors import UserError

if TYPE_CHECKING:
    from scratchllm.serve.session import ChatSession

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


def register(commands) -> argparse.ArgumentParser:
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


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    """Load the checkpoint and chat: once with --prompt, else interactively until /exit."""
    from scratchllm.checkpoint import load_chat_model
    from scratchllm.data.chat import get_template
    from scratchllm.serve.session import ChatSession

    if args.template is not None:
        get_template(args.template)  # a bad name fails before the model loads
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer, saved = load_chat_model(args.checkpoint, args.device, args.dtype)
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
