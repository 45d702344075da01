"""The HTTP server: OpenAI's /v1 endpoints over the batching engine, /health, and the chat page.

Each HTTP request becomes one engine Request per choice; the engine thread posts their events
into the request's asyncio queue (call_soon_threadsafe). A streaming reply sends each event as
a Server-Sent Event as soon as it arrives; when the client goes away, Starlette cancels the
stream and the `finally` cancels the engine requests, so their slots are free before the next
decode step. Every error, a bad request or a full queue, is an OpenAI-style error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from scratchllm.data.chat import Template
from scratchllm.errors import UserError
from scratchllm.generate.sampling import SamplingConfig
from scratchllm.serve.engine import Delta, Done, Engine, QueueFull, Request
from scratchllm.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    envelope,
    error_body,
    models_list,
    new_id,
    usage,
)
from scratchllm.serve.session import conversation_ids, end_ids

MAX_BODY = 1 << 20  # bytes of a request body (1 MiB): far more than any context holds
PAGE_HEADERS = {
    # The page is one file with inline script and style; it talks only to this server.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@dataclass
class ServerConfig:
    """What the server needs besides the engine."""

    model_name: str
    template: Template | None = None  # None: /v1/chat/completions answers 400
    api_key: str | None = None  # None: no authentication
    max_body: int = MAX_BODY
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI application; it starts the engine's thread at startup, stops it at shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        handlers.inbox = Inbox(asyncio.get_running_loop())
        engine.flush = handlers.inbox.wake
        engine.start()
        yield
        engine.stop()
        engine.flush = None

    app = FastAPI(title="scratchllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    handlers = _Handlers(engine, config)
    app.add_api_route("/health", handlers.health, methods=["GET"])
    app.add_api_route("/", handlers.page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models", handlers.models, methods=["GET"])
    app.add_api_route("/v1/completions", handlers.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", handlers.chat, methods=["POST"])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body)
    return app


# ---- errors ----------------------------------------------------------------------------------


def _json_error(status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_: HttpRequest, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return _json_error(e.status, e.body(), headers)


async def _validation_error(_: HttpRequest, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
        return _json_error(400, error_body("the body is not a JSON object: send one",
                                           code="invalid_json"))
    # The pydantic location without "body" and the type tags of unions: "messages.0.role".
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else \
        f"invalid request: {first.get('msg', 'send a JSON object')}"
    return _json_error(400, error_body(message, param=param, code="invalid_value"))


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list"}
                                      or part.startswith(("list[", "function-", "TextPart")))


async def _http_error(_: HttpRequest, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    messages = {404: "no such path: see GET /v1/models, POST /v1/completions, "
                     "POST /v1/chat/completions", 405: "method not allowed on this path",
                400: "the body is not a JSON object: send one"}  # e.g. nested too deep
    return _json_error(e.status_code, error_body(messages.get(e.status_code, str(e.detail)),
                                                 code=str(e.status_code)))


async def _internal_error(_: HttpRequest, e: Exception) -> JSONResponse:
    return _json_error(500, error_body(f"internal error ({type(e).__name__}): please report it",
                                       kind="server_error"))


class Guard:
    """ASGI middleware: the API key on /v1 (Bearer, constant-time) and the body size limit."""

    def __init__(self, app: Callable, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest takes as long for any wrong key: no timing hint of the right one.
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given \
                    else "incorrect API key"
                return await _send_json(send, 401, error_body(message, code="invalid_api_key"))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(headers, receive)
            if body is None:
                return await _send_json(send, 413, error_body(
                    f"the request body is larger than {self.max_body} bytes: send less",
                    code="request_too_large"))
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Callable) -> bytes | None:
        """The whole body, or None when it is over the limit (said or seen)."""
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(parts)


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    """A receive() that gives `body` once, then what the client sends (its disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Callable, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ---- from the engine's thread to a request handler --------------------------------------------


class Pending:
    """The engine requests of one HTTP request; their events, in order, as an async iterator."""

    def __init__(self, engine: Engine, requests: list[Request], inbox: Inbox) -> None:
        self.engine, self.requests = engine, requests
        self.queue: asyncio.Queue[tuple[int, Delta | Done]] = asyncio.Queue()
        for i, req in enumerate(requests):
            req.emit = partial(inbox.post, self.queue, i)
        self.open = len(requests)

    def submit(self) -> None:
        """Queue the requests in the engine; a full queue is a 429."""
        try:
            self.engine.submit(*self.requests)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", code="server_busy",
                           kind="rate_limit_error") from None
        except UserError as e:
            raise ApiError(400, str(e)) from None

    def cancel(self) -> None:
        """Stop every request (a no-op for those already done)."""
        for req in self.requests:
            self.engine.cancel(req)

    async def events(self) -> AsyncIterator[tuple[int, Delta | Done]]:
        """(choice index, event) until every request is done; leaving early cancels the rest."""
        try:
            while self.open:
                index, event = await self.queue.get()
                if isinstance(event, Done):
                    self.open -= 1
                yield index, event
        finally:
            if self.open:
                self.cancel()

    async def collect(self, http: HttpRequest) -> list[Choice]:
        """Every choice's whole output; a client that disconnects meanwhile cancels them."""
        choices = [Choice() for _ in self.requests]

        async def watch() -> None:
            while not await http.is_disconnected():
                await asyncio.sleep(0.1)
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for index, event in self.events():
                choices[index].add(event)
        finally:
            watcher.cancel()
        for choice in choices:
            if choice.done is not None and choice.done.finish_reason == "error":
                raise ApiError(500, f"generation failed: {choice.done.error}",
                               kind="server_error")
        return choices


class Inbox:
    """Events from the engine's thread into the event loop's queues, handed over in batches.

    Waking the loop (call_soon_threadsafe writes to its self-pipe) costs the engine's thread a
    system call, and the woken loop takes the GIL while the engine still has work: so `post`
    only collects, and `wake` (the engine's flush, once per burst: a decode step's tokens)
    hands the batch over.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.events: list[tuple[asyncio.Queue, tuple[int, Delta | Done]]] = []
        self.waking = False  # a wake-up is on its way: later events ride along

    def post(self, queue: asyncio.Queue, index: int, event: Delta | Done) -> None:
        """Collect (index, event) for `queue` (the engine's thread)."""
        with self.lock:
            self.events.append((queue, (index, event)))

    def wake(self) -> None:
        """Have the loop deliver what was posted (the engine's thread)."""
        with self.lock:
            if self.waking or not self.events:
                return
            self.waking = True
        self.loop.call_soon_threadsafe(self.deliver)  # a closed loop raises: requests cancel

    def deliver(self) -> None:
        """Put everything posted so far into its queue (the loop)."""
        with self.lock:
            events, self.events, self.waking = self.events, [], False
        for queue, item in events:
            queue.put_nowait(item)


@dataclass
class Choice:
    """One choice's output so far."""

    pieces: list[str] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)  # those with a token (for logprobs)
    done: Done | None = None

    def add(self, event: Delta | Done) -> None:
        """Record an event."""
        if isinstance(event, Done):
            self.done = event
            return
        self.pieces.append(event.text)
        if event.token is not None:
            self.deltas.append(event)

    @property
    def text(self) -> str:
        """All text so far."""
        return "".join(self.pieces)


# ---- the endpoints ---------------------------------------------------------------------------


class _Handlers:
    """The route functions, sharing the engine and the configuration."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        self.context = engine.context
        self.page_html = resources.files("scratchllm.serve").joinpath("page.html").read_text(
            encoding="utf-8")
        self.inbox: Inbox | None = None  # set at startup, with the engine's flush

    def _pending(self, requests: list[Request]) -> Pending:
        """The requests wired to the inbox, submitted to the engine."""
        assert self.inbox is not None, "the app's lifespan starts the engine and the inbox"
        pending = Pending(self.engine, requests, self.inbox)
        pending.submit()
        return pending

    async def health(self) -> dict[str, Any]:
        """Liveness and load: slots, active rows, waiting requests."""
        return {"status": "ok", "model": self.config.model_name, "context": self.context,
                **self.engine.stats()}

    async def page(self) -> HTMLResponse:
        """The chat page."""
        return HTMLResponse(self.page_html, headers=PAGE_HEADERS)

    async def models(self) -> dict[str, Any]:
        """The one model this server holds."""
        return models_list(self.config.model_name, self.config.created)

    async def completions(self, body: CompletionRequest, http: HttpRequest) -> Any:
        """Text completion of one or more prompts."""
        self._check_model(body.model)
        if body.echo:
            raise ApiError(400, "echo is not supported: join the prompt yourself", "echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        prompts = [self._encode(p) for p in body.prompts()]
        stop_ids = tuple(self.tokenizer.special_tokens[t] for t in ("<|endoftext|>",)
                         if t in self.tokenizer.special_tokens)
        n = body.n or 1
        requests = [self._request(body, prompt, body.max_tokens or 16, stop_ids, i % n,
                                  body.logprobs)
                    for prompt in prompts for i in range(n)]
        prompt_tokens = sum(len(p) for p in prompts)
        pending = self._pending(requests)
        rid = new_id("cmpl")
        if body.stream:
            chunks = self._completion_chunks(pending, rid, body, prompt_tokens)
            return _sse(chunks)
        choices = await pending.collect(http)
        out = [{"index": i, "text": c.text,
                "logprobs": self._completion_logprobs(c.deltas) if body.logprobs is not None
                else None,
                "finish_reason": c.done.finish_reason if c.done else "stop"}
               for i, c in enumerate(choices)]
        return envelope("text_completion", rid, body.model, out,
                        usage=usage(prompt_tokens, _generated(choices)))

    async def chat(self, body: ChatRequest, http: HttpRequest) -> Any:
        """The next assistant message of a conversation, in the checkpoint's chat template."""
        self._check_model(body.model)
        template = self.config.template
        if template is None:
            raise ApiError(400, "this checkpoint has no chat template (a base model?): use "
                                "/v1/completions, or restart the server with --template chat")
        messages = [m.as_dict() for m in body.messages]
        try:
            prompt = conversation_ids(template, self.tokenizer, messages)
        except UserError as e:
            raise ApiError(400, str(e), "messages") from None
        self._check_length(prompt, "messages")
        n = body.n or 1
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens or self.context
        requests = [self._request(body, prompt, max_tokens, end_ids(template, self.tokenizer),
                                  i, top) for i in range(n)]
        pending = self._pending(requests)
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(self._chat_chunks(pending, rid, body, len(prompt)))
        choices = await pending.collect(http)
        out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": self._chat_logprobs(c.deltas) if top is not None else None,
                "finish_reason": c.done.finish_reason if c.done else "stop"}
               for i, c in enumerate(choices)]
        return envelope("chat.completion", rid, body.model, out,
                        usage=usage(len(prompt), _generated(choices)))

    # ---- building requests --------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server has "
                                f"{self.config.model_name!r} (GET /v1/models)", "model",
                           "model_not_found")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allowed_special="all")
            if not ids and "<|endoftext|>" in self.tokenizer.special_tokens:
                ids = [self.tokenizer.special_tokens["<|endoftext|>"]]  # "" starts a document
        else:
            ids = prompt
        if not ids:
            raise ApiError(400, "the prompt is empty: give some text", "prompt")
        if min(ids) < 0 or max(ids) >= self.engine.vocab:
            raise ApiError(400, f"prompt token ids must be in 0..{self.engine.vocab - 1}",
                           "prompt")
        self._check_length(ids, "prompt")
        return ids

    def _check_length(self, ids: list[int], param: str) -> None:
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but this model's context is "
                                f"{self.context} tokens (prompt and reply together): shorten "
                                "it", param, "context_length_exceeded")

    def _request(self, body: CompletionRequest | ChatRequest, prompt: list[int],
                 max_tokens: int, stop_ids: tuple[int, ...], index: int,
                 logprobs: int | None) -> Request:
        if max_tokens > self.context:
            raise ApiError(400, f"max_tokens is {max_tokens} but this model's context is "
                                f"{self.context} tokens: ask for at most that many",
                           "max_tokens")
        try:
            sampling = SamplingConfig(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=body.top_p, presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        # Any integer is a seed: torch's generators take 64 bits.
        seed = None if body.seed is None else (body.seed + index) % 2**64
        return Request(prompt, max_tokens, sampling, stop_ids, body.stops(), seed, logprobs)

    # ---- streaming ----------------------------------------------------------------------------

    async def _completion_chunks(self, pending: Pending, rid: str, body: CompletionRequest,
                                 prompt_tokens: int) -> AsyncIterator[dict[str, Any]]:
        created, generated = int(time.time()), 0

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return envelope("text_completion", rid, body.model, choices, created, **extra)

        async for index, event in pending.events():
            if isinstance(event, Done):
                generated += event.completion_tokens
                yield _error_or(event) or chunk([{"index": index, "text": "", "logprobs": None,
                                                  "finish_reason": event.finish_reason}])
            elif event.text or body.logprobs is not None:
                lp = self._completion_logprobs([event]) if body.logprobs is not None else None
                yield chunk([{"index": index, "text": event.text, "logprobs": lp,
                              "finish_reason": None}])
        if body.include_usage:
            yield chunk([], usage=usage(prompt_tokens, generated))

    async def _chat_chunks(self, pending: Pending, rid: str, body: ChatRequest,
                           prompt_tokens: int) -> AsyncIterator[dict[str, Any]]:
        created, generated = int(time.time()), 0
        want_logprobs = bool(body.logprobs)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return envelope("chat.completion.chunk", rid, body.model, choices, created, **extra)

        for index in range(len(pending.requests)):  # the role first, as OpenAI does
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for index, event in pending.events():
            if isinstance(event, Done):
                generated += event.completion_tokens
                yield _error_or(event) or chunk([{"index": index, "delta": {}, "logprobs": None,
                                                  "finish_reason": event.finish_reason}])
            elif event.text or want_logprobs:
                lp = self._chat_logprobs([event]) if want_logprobs else None
                yield chunk([{"index": index, "delta": {"content": event.text}, "logprobs": lp,
                              "finish_reason": None}])
        if body.include_usage:
            yield chunk([], usage=usage(prompt_tokens, generated))

    # ---- log-probabilities --------------------------------------------------------------------

    def _token_bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])

    def _token_text(self, token: int) -> str:
        return self._token_bytes(token).decode("utf-8", errors="replace")

    def _completion_logprobs(self, deltas: list[Delta]) -> dict[str, Any]:
        """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens = [self._token_text(d.token) for d in deltas if d.token is not None]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [d.logprob for d in deltas],
                "top_logprobs": [{self._token_text(t): lp for t, lp in d.top or []}
                                 for d in deltas],
                "text_offset": offsets}

    def _chat_logprobs(self, deltas: list[Delta]) -> dict[str, Any]:
        """The chat format: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        def entry(token: int, logprob: float | None) -> dict[str, Any]:
            return {"token": self._token_text(token), "logprob": logprob,
                    "bytes": list(self._token_bytes(token))}

        return {"content": [{**entry(d.token, d.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in d.top or []]}
                            for d in deltas if d.token is not None]}


def _generated(choices: list[Choice]) -> int:
    return sum(c.done.completion_tokens for c in choices if c.done is not None)


def _error_or(done: Done) -> dict[str, Any] | None:
    """An error object for a stream whose request failed, else None."""
    if done.finish_reason != "error":
        return None
    return error_body(f"generation failed: {done.error}", kind="server_error")


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-Sent Events as OpenAI sends them: `data: {json}` per chunk, then `data: [DONE]`."""
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    # no-cache and no proxy buffering: each token reaches the client as it is made.
    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- running ---------------------------------------------------------------------------------


class ServerThread:
    """The app served by uvicorn in a background thread on host:port (0: a free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        self.socket = socket.create_server((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
