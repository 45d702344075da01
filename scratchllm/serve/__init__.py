"""Serving: a continuous-batching engine, an OpenAI-compatible HTTP API and a web chat page.

Modules: `session` (conversations to prompt ids; the terminal chat's history), `engine` (the
batched KV-cache decoder in its own thread), `protocol` (request models, OpenAI-style errors and
response bodies), `app` (the FastAPI application) and `page.html` (the chat page). Importing
this package imports nothing heavy: `app` needs the `serve` extra (fastapi, uvicorn).
"""
