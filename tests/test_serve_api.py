"""The HTTP server through the real `openai` client (and raw HTTP for what a client would not
send): models, completions and chat (plain and streamed) against generate() as the oracle,
concurrent requests sharing decode steps, stops, usage; bad input of every kind answered with the
right status and an OpenAI-style error while the server keeps serving; `scratchllm serve`."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from scratchllm.checkpoint import load_chat_model
from scratchllm.data.chat import CHAT_SPECIALS, ensure_special_tokens, get_template
from scratchllm.generate import generate
from scratchllm.model import GPT, GPTConfig
from scratchllm.serve.app import ServerConfig, ServerThread, create_app
from scratchllm.serve.engine import Engine
from scratchllm.serve.session import conversation_ids, end_ids
from scratchllm.tokenizer import CharTokenizer
from tests.test_chat_cli import TEXT, make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-123"


def random_chat_checkpoint(path: Path, context: int = 128) -> Path:
    """Random weights (scaled up: replies depend on the prompt), chat tokens and template."""
    tok = ensure_special_tokens(CharTokenizer.train([TEXT]), CHAT_SPECIALS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=context, n_layer=2,
                          n_head=2, n_embd=32, init_std=0.3))
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    (path / "template.json").write_text(json.dumps({"template": "chat"}))
    return path


def start(checkpoint: Path, **options) -> tuple[ServerThread, Engine]:
    model, tok, template = load_chat_model(checkpoint, "cpu")
    engine = Engine(model, tok, slots=options.pop("slots", 4),
                    max_queue=options.pop("max_queue", 16))
    app = create_app(engine, ServerConfig("tiny", get_template(template), **options))
    return ServerThread(app).__enter__(), engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random chat model served without an API key; yields (url, engine)."""
    server, engine = start(random_chat_checkpoint(tmp_path_factory.mktemp("random")))
    yield server.url, engine
    server.__exit__()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One slot, no queue, an API key, a 2 KiB body limit, and replies that never end by
    themselves at temperature 0 ('a' forever): for errors, 429 and disconnects."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("guarded"),
                           {"a": 6.0, "b": 6.0, "<|end|>": 4.0}, context_length=1024)
    server, engine = start(ckpt, slots=1, max_queue=0, api_key=KEY, max_body=2048)
    yield server.url, engine
    server.__exit__()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def oracle(engine: Engine, ids: list[int], max_tokens: int, stop_ids=()) -> str:
    """What generate() says, greedy, as text."""
    tok = engine.tokenizer
    out = generate(engine.model, ids, max_tokens, temperature=0, stop_ids=stop_ids)
    return tok.decode(out)


def chat_prompt(engine: Engine, messages) -> list[int]:
    return conversation_ids(get_template("chat"), engine.tokenizer, messages)


# ---- the openai client -------------------------------------------------------------------------


def test_models_completion_and_chat(served):
    url, engine = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]

    out = c.completions.create(model="tiny", prompt="Hello there", max_tokens=20, temperature=0)
    ids = engine.tokenizer.encode("Hello there")
    assert out.choices[0].text == oracle(engine, ids, 20)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 20)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                     temperature=0)
    prompt = chat_prompt(engine, messages)
    ends = end_ids(get_template("chat"), engine.tokenizer)
    assert chat.choices[0].message.content == oracle(engine, prompt, 30, ends)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt)
    assert chat.usage.total_tokens == len(prompt) + chat.usage.completion_tokens


def test_streaming_matches_the_whole_reply(served):
    url, _ = served
    c = client(url)
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=40,
                                      temperature=0).choices[0].message.content
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=40,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] in ("stop", "length") and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    pieces = list(c.completions.create(model="tiny", prompt="Once", max_tokens=25,
                                       temperature=0, stream=True))
    text = "".join(p.choices[0].text for p in pieces)
    assert text == c.completions.create(model="tiny", prompt="Once", max_tokens=25,
                                        temperature=0).choices[0].text


def test_concurrent_requests_share_decode_steps(served):
    url, engine = served
    c = client(url)
    prompts = ["The cat", "A dog and", "Why?", "Seven", "x y z", "Hello, world", "0123", "End."]
    before = engine.stats()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: c.completions.create(
            model="tiny", prompt=p, max_tokens=60, temperature=0).choices[0].text, prompts))
    after = engine.stats()
    for prompt, text in zip(prompts, outs, strict=True):
        assert text == oracle(engine, engine.tokenizer.encode(prompt), 60)
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens == 60 * len(prompts) and steps < tokens / 2  # decoded together


def test_stop_n_seed_and_logprobs(served):
    url, engine = served
    c = client(url)
    full = c.completions.create(model="tiny", prompt="abc", max_tokens=30,
                                temperature=0).choices[0].text
    stop = full[10:13]
    cut = c.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0,
                               stop=[stop, "never-appears"])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    sampled = [c.completions.create(model="tiny", prompt="abc", max_tokens=20, n=3, seed=5,
                                    temperature=1.0, top_p=0.9, presence_penalty=0.5)
               for _ in range(2)]
    texts = [[ch.text for ch in out.choices] for out in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded; choice i uses seed + i
    assert [ch.index for ch in sampled[0].choices] == [0, 1, 2]
    eot = (engine.tokenizer.eot_id,)
    counted = 0
    for i, text in enumerate(texts[0]):  # what generate() samples with the same seed
        ids = generate(engine.model, engine.tokenizer.encode("abc"), 20, seed=5 + i,
                       temperature=1.0, top_p=0.9, presence_penalty=0.5, stop_ids=eot)
        assert text == engine.tokenizer.decode(ids)
        counted += len(ids) + (len(ids) < 20)  # a stop token counts as generated
    assert sampled[0].usage.completion_tokens == counted

    lp = c.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0,
                              logprobs=2).choices[0].logprobs
    assert "".join(lp.tokens) == full[:5] and len(lp.token_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and len(top) == 2 and max(top.values()) == pytest.approx(value)
        assert max(top, key=top.get) == token  # greedy took the likeliest
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=4, temperature=0, logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == 1 for e in content)


def test_client_errors_are_openai_errors(guarded):
    url, _ = guarded
    with pytest.raises(openai.AuthenticationError):
        client(url).models.list()
    c = client(url, KEY)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="tiny", prompt="hi", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a" * 1100}])


# ---- bad input over raw HTTP -------------------------------------------------------------------


def post(url: str, path: str, body, key: str | None = KEY, method: str = "POST",
         headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data if method == "POST" else None, headers=h)
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, json.loads(payload)


def chat_body(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **fields}


def open_stream(url: str, body: dict, chunks: int = 2) -> socket.socket:
    """Send a chat request and read its first `chunks` tokens (streaming); returns the socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    seen = b""
    while chunks and seen.count(b"data: ") < chunks + 1:  # the role chunk, then tokens
        seen += sock.recv(65536)
    assert not chunks or b" 200 " in seen.split(b"\r\n")[0]
    return sock


def wait(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def wait_idle(url: str) -> dict:
    """/health once nothing is active or waiting."""
    wait(lambda: post(url, "/health", None, method="GET")[1]["active"] == 0)
    return post(url, "/health", None, method="GET")[1]


def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(guarded):
    url, _ = guarded
    cases = [  # (body, extra, status, code or param)
        (b'{"model": "tiny", "messages": [', {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, None),
        (chat_body(temperature="hot"), {}, 400, "temperature"),
        (chat_body(max_tokens="5"), {}, 400, "max_tokens"),
        (chat_body(stream="yes"), {}, 400, "stream"),
        (chat_body(messages="hi"), {}, 400, "messages"),
        (chat_body(messages=[{"role": "robot", "content": "hi"}]), {}, 400, "messages.0.role"),
        (chat_body(messages=[]), {}, 400, "messages"),
        (chat_body(max_tokens=-1), {}, 400, "max_tokens"),
        (chat_body(max_tokens=0), {}, 400, "max_tokens"),
        (chat_body(max_tokens=10**12), {}, 400, "max_tokens"),
        (chat_body(top_p=0), {}, 400, "top_p"),
        (chat_body(n=100), {}, 400, "n"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), {}, 400, "stop"),
        (chat_body(model="gpt-4"), {}, 404, "model_not_found"),
        (chat_body(messages=[{"role": "user", "content": "x" * 1100}]), {}, 400,
         "context_length_exceeded"),
        (chat_body(messages=[{"role": "user", "content": "x" * 5000}]), {}, 413,
         "request_too_large"),
        (chat_body(), {"key": None}, 401, "invalid_api_key"),
        (chat_body(), {"key": "wrong-key"}, 401, "invalid_api_key"),
        (chat_body(), {"path": "/v1/nothing"}, 404, None),
        (chat_body(), {"path": "/v1/chat/completions", "method": "GET"}, 405, None),
        ({"model": "tiny", "prompt": [99999]}, {"path": "/v1/completions"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "hi", "logprobs": 9}, {"path": "/v1/completions"}, 400,
         "logprobs"),
    ]
    for body, extra, status, tag in cases:
        got, payload = post(url, extra.get("path", "/v1/chat/completions"), body,
                            extra.get("key", KEY), extra.get("method", "POST"))
        error = payload.get("error")
        assert got == status, (body, payload)
        assert error and error["message"] and error["type"], payload
        if tag is not None:
            assert tag in (error["code"], error["param"]), (tag, error)

    # A client that goes away mid-stream frees its slot at once; while it streams, the one slot
    # is taken and the queue holds nothing: 429.
    cancelled = wait_idle(url)["cancelled"]
    endless = chat_body(max_tokens=1000, temperature=0, stream=True)
    sock = open_stream(url, endless)
    status, payload = post(url, "/v1/chat/completions", chat_body())
    assert status == 429 and payload["error"]["code"] == "server_busy"
    sock.close()
    assert wait_idle(url)["cancelled"] == cancelled + 1
    # So does one that waits for a whole (long) reply and goes away.
    sock = open_stream(url, {**endless, "stream": False}, chunks=0)
    wait(lambda: post(url, "/health", None, method="GET")[1]["active"] == 1)
    sock.close()
    assert wait_idle(url)["cancelled"] == cancelled + 2

    status, payload = post(url, "/v1/chat/completions", chat_body(temperature=0))
    assert status == 200 and payload["choices"][0]["message"]["content"] == "aaa"
    assert payload["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


# ---- the command -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", {"a": 6.0, "<|end|>": 5.0})
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCRATCHLLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "scratchllm", "serve", "--checkpoint",
                             str(ckpt), "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = post(url, "/health", None, method="GET")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert status == 200 and health["model"] == "run" and health["slots"] == 8
        assert post(url, "/v1/models", None, key=None, method="GET")[0] == 401
        out = client(url, KEY).chat.completions.create(
            model="run", messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert out.choices[0].message.content.startswith("a")
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"serving run (chat template chat) at http://127.0.0.1:{port}/" in stdout


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from scratchllm.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert main(["serve", "--checkpoint", str(tmp_path), "--slots", "0"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "--slots must be >= 1" in lines[1]
