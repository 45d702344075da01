"""`scratchllm serve`: an OpenAI-compatible HTTP API and a web chat page for a checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scratchllm.errors import UserError

DESCRIPTION = """Serve a checkpoint (or a run directory: its newest checkpoint) over HTTP:
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (OpenAI's API, streaming with
"stream": true), GET /health, and a chat page at /. Concurrent requests share decode steps
(continuous batching over --slots rows); up to --max-queue more wait, beyond that a request gets
429. Chat uses the checkpoint's template.json (else --template). Binds 127.0.0.1 unless --host
says otherwise: put a reverse proxy with TLS in front before exposing it. --api-key (or the
SCRATCHLLM_API_KEY environment variable, which keeps the key out of `ps`) makes /v1 ask for
'Authorization: Bearer KEY'. Needs the serve extra: pip install 'scratchllm[serve]'."""


def register(commands) -> argparse.ArgumentParser:
    """Add `scratchllm serve` to an argparse subparsers object; returns its parser."""
    p = commands.add_parser("serve", help="serve a checkpoint: OpenAI-compatible API + chat page",
                            description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint directory or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("SCRATCHLLM_API_KEY"),
                   help="require this Bearer key on /v1 (default: $SCRATCHLLM_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint "
                                        "directory's name)")
    p.add_argument("--template", help="chat or alpaca (default: the checkpoint's template.json)")
    p.add_argument("--slots", type=int, default=8, metavar="N",
                   help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body (default 1 MiB)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: auto)")
    p.add_argument("--dtype", default="float32",
                   choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and KV cache (default float32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the checkpoint, build the engine and the app, and serve until Ctrl-C."""
    try:
        import uvicorn

        from scratchllm.serve.app import ServerConfig, create_app
    except ImportError as e:
        raise UserError(f"serving needs {e.name}: pip install 'scratchllm[serve]'") from None
    from scratchllm.checkpoint import find_checkpoint, load_chat_model
    from scratchllm.data.chat import get_template
    from scratchllm.runtime import set_threads
    from scratchllm.serve.engine import Engine
    from scratchllm.serve.session import conversation_ids

    for name, value, least in (("--slots", args.slots, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-body", args.max_body, 1024), ("--port", args.port, 0)):
        if value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    if args.template is not None:
        get_template(args.template)  # a bad name fails before the model loads
    set_threads(args.threads)
    checkpoint = find_checkpoint(args.checkpoint)
    model, tokenizer, saved = load_chat_model(checkpoint, args.device, args.dtype)
    name = args.template or saved
    template = get_template(name) if name else None
    if template is not None:  # a tokenizer without the template's tokens fails now
        conversation_ids(template, tokenizer, [{"role": "user", "content": ""}])
    model_name = args.model_name or _default_name(checkpoint)
    engine = Engine(model, tokenizer, slots=args.slots, max_queue=args.max_queue)
    app = create_app(engine, ServerConfig(model_name, template, args.api_key, args.max_body))
    chat = f"chat template {template.name}" if template else "no chat template (--template)"
    print(f"serving {model_name} ({chat}) at http://{args.host}:{args.port}/ "
          f"({args.slots} slots{', API key required' if args.api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def _default_name(checkpoint: Path) -> str:
    """The run's name for RUN/checkpoints/step-N, else the checkpoint directory's name."""
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent.name
    return checkpoint.name
