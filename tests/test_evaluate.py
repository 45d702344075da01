"""`scratchllm evaluate`: judge parsing and retries, resumable results, response loss, the CLI."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from scratchllm.cli import main
from scratchllm.data.chat import CHAT_SPECIALS, ensure_special_tokens, render_prompt
from scratchllm.errors import UserError
from scratchllm.evaluate.judge import JudgeClient, judge_prompt, parse_score
from scratchllm.evaluate.responses import (
    evaluate,
    load_examples,
    read_results,
    response_loss,
    split_records,
    to_example,
)
from scratchllm.model import GPT, GPTConfig
from scratchllm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. ### Instruction: Rewrite the sentence. ### Input: The cat sat. "
        "### Response: It sat on the mat. Name a colour. Blue. Green, of course. ") * 3
RECORDS = [{"instruction": f"Name colour number {i}.", "input": "" if i % 2 else "Be brief.",
            "output": f"Colour {i} is blue."} for i in range(4)]
REPLIES = ["85", "Score: 120", "no idea", "  42 points"]


class Judge:
    """A local OpenAI-style chat/completions server answering with scripted replies."""

    def __init__(self, replies, status=200):
        self.replies, self.status, self.requests = list(replies), status, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, dict(self.headers), body))
                status = judge.status if isinstance(judge.status, int) else judge.status.pop(0)
                reply = judge.replies[(len(judge.requests) - 1) % len(judge.replies)]
                payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                               "content": reply}}]})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode() if status == 200 else b'{"error": "nope"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    servers = []

    def start(replies=REPLIES, status=200):
        servers.append(Judge(replies, status))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny GPT, a BPE tokenizer with chat specials, saved as a checkpoint dir."""
    tok = ensure_special_tokens(Tokenizer.train([TEXT], vocab_size=300), CHAT_SPECIALS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_layer=1, n_head=2,
                          n_embd=32)).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    (path / "template.json").write_text(json.dumps({"template": "alpaca"}))
    return path, model, tok


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---- judge -----------------------------------------------------------------------------------


def test_parse_score_robust():
    assert [parse_score(r) for r in REPLIES] == [85, None, None, 42]
    assert parse_score("100") == 100 and parse_score("0") == 0 and parse_score("-3") is None
    assert parse_score("") is None and parse_score(None) is None
    assert parse_score("I'd say 70/100") == 70


def test_judge_prompt_is_the_books():
    assert judge_prompt("P", "R", "M") == (
        "Given the input `P` and correct output `R`, score the model response `M` on a scale "
        "from 0 to 100, where 100 is the best score. Respond with the integer number only.")


def test_judge_client_request_and_scores(judge_server):
    server = judge_server()
    client = JudgeClient(server.url, "judge-7b", api_key="sekrit")
    results = [client.score("p", "r", f"m{i}") for i in range(4)]
    assert results == [(85, "85"), (None, "Score: 120"), (None, "no idea"), (42, "  42 points")]
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekrit"
    assert body["model"] == "judge-7b" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": judge_prompt("p", "r", "m0")}]


def test_judge_connection_failure_is_one_line():
    url = closed_port_url()
    client = JudgeClient(url, "m", retries=2, backoff=0)
    with pytest.raises(UserError) as e:
        client.chat("hi")
    assert client.calls == 3 and url in str(e.value) and "\n" not in str(e.value)


def test_judge_retries_server_errors_not_client_errors(judge_server):
    server = judge_server(["77"], status=[500, 503, 200])
    assert JudgeClient(server.url, "m", backoff=0).score("p", "r", "m") == (77, "77")
    assert len(server.requests) == 3
    server = judge_server(["77"], status=404)
    with pytest.raises(UserError, match="HTTP 404"):
        JudgeClient(server.url, "m", backoff=0).chat("hi")
    assert len(server.requests) == 1


def test_judge_bad_url_and_bad_answer(judge_server):
    with pytest.raises(UserError, match="http://"):
        JudgeClient("localhost:8080", "m")
    server = judge_server()
    server.replies = [None]  # content null: an empty reply, scored invalid, no crash
    assert JudgeClient(server.url, "m").score("p", "r", "x") == (None, "")


# ---- data ------------------------------------------------------------------------------------


def test_books_split_sizes():
    records = list(range(1100))
    sizes = {s: len(split_records(records, s)) for s in ("train", "test", "val", "all")}
    assert sizes == {"train": 935, "test": 110, "val": 55, "all": 1100}
    assert split_records(records, "test")[0] == (935, 935)
    with pytest.raises(UserError, match="unknown split"):
        split_records(records, "dev")


def test_examples_from_records_and_conversations(tmp_path):
    alpaca = to_example(3, {"instruction": "Do it.", "input": "Now.", "output": "Done."})
    assert alpaca.prompt.endswith("### Instruction:\nDo it.\n\n### Input:\nNow.")
    assert alpaca.reference == "Done." and alpaca.key.startswith("3:")
    chat = to_example(0, {"messages": [{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello"},
                                       {"role": "user", "content": "Bye"},
                                       {"role": "assistant", "content": "Ciao"}]})
    assert chat.reference == "Ciao" and chat.prompt.endswith("user: Bye")
    with pytest.raises(UserError, match="example 1"):
        to_example(1, {"instruction": "no output"})
    file = tmp_path / "d.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert [e.index for e in load_examples(str(file))] == [0, 1, 2, 3]


# ---- response loss ---------------------------------------------------------------------------


def test_response_loss_matches_definition(tiny):
    _, model, tok = tiny
    example = to_example(0, RECORDS[0])
    total, count = response_loss(model, tok, "alpaca", example)
    prompt = render_prompt("alpaca", RECORDS[0], tok)
    answer = tok.encode_ordinary(RECORDS[0]["output"]) + [tok.special_tokens["<|endoftext|>"]]
    ids = prompt + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], dim=-1)
    nll = -sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
    assert count == len(answer)
    assert total == pytest.approx(float(nll), rel=1e-5)


def test_response_loss_counts_only_the_last_reply(tiny):
    _, model, tok = tiny
    conversation = {"messages": [{"role": "user", "content": "Name a colour."},
                                 {"role": "assistant", "content": "Blue."},
                                 {"role": "user", "content": "Another one?"},
                                 {"role": "assistant", "content": "Green, of course."}]}
    _, count = response_loss(model, tok, "chat", to_example(0, conversation))
    assert count == len(tok.encode_ordinary("\nGreen, of course.")) + 1


# ---- evaluate and resume ---------------------------------------------------------------------


def test_evaluate_scores_counts_and_resumes(tiny, tmp_path, judge_server):
    _, model, tok = tiny
    server = judge_server()
    examples = [to_example(i, r) for i, r in enumerate(RECORDS)]
    out = tmp_path / "res.jsonl"
    first = evaluate(model, tok, "alpaca", examples[:2], out, max_new_tokens=4)
    assert (first.generated, first.unscored, len(server.requests)) == (2, 2, 0)
    judge = JudgeClient(server.url, "j")
    s = evaluate(model, tok, "alpaca", examples, out, max_new_tokens=4, judge=judge)
    assert (s.examples, s.generated, s.judged) == (4, 2, 4)
    assert s.scores == [85, 42] and s.mean_score == 63.5 and s.invalid_scores == 2
    assert s.loss_tokens > 0 and s.perplexity == pytest.approx(2.718281828 ** s.mean_loss)
    again = evaluate(model, tok, "alpaca", examples, out, max_new_tokens=4, judge=judge)
    assert (again.generated, again.judged, len(server.requests)) == (0, 0, 4)
    assert again.scores == s.scores and again.mean_loss == pytest.approx(s.mean_loss)
    records = read_results(out)
    assert [r["judge_score"] for r in records.values()] == [85, None, None, 42]
    assert {"prompt", "reference", "response", "response_loss"} <= set(records[examples[0].key])


def test_torn_last_line_is_dropped(tiny, tmp_path):
    _, model, tok = tiny
    out = tmp_path / "res.jsonl"
    examples = [to_example(i, r) for i, r in enumerate(RECORDS[:2])]
    evaluate(model, tok, "alpaca", examples, out, max_new_tokens=2)
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:20])
    s = evaluate(model, tok, "alpaca", examples, out, max_new_tokens=2)
    assert s.generated == 1 and len(out.read_text().splitlines()) == 2


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_end_to_end(tiny, tmp_path, judge_server, capsys):
    path, _, _ = tiny
    server = judge_server()
    out = tmp_path / "eval.jsonl"
    argv = ["evaluate", "--checkpoint", str(path), "--data", "instruction-data", "--split",
            "test", "--out", str(out), "--limit", "3", "--max-new-tokens", "5", "--device",
            "cpu", "--judge-url", server.url, "--judge-model", "j"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == [935, 936, 937]
    assert [r["judge_score"] for r in lines] == [85, None, None]
    assert "examples: 3 (3 generated now" in text and "perplexity" in text
    assert "judge score: 85.00 mean over 1 valid (2 invalid, 0 not scored" in text
    assert main(argv) == 0 and len(server.requests) == 3
    assert "0 generated now" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.json"], "not found"),
    (["--data", "no-such-dataset"], "unknown dataset"),
    (["--judge-url", "http://127.0.0.1:1/v1"], "--judge-model"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--limit", "0"], "--limit"),
    (["--template", "alpacca"], "did you mean 'alpaca'"),
])
def test_cli_bad_input_one_line(tiny, tmp_path, capsys, extra, message):
    path, _, _ = tiny
    argv = ["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "o.jsonl"),
            "--device", "cpu", "--limit", "1", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_cli_bad_files_and_unreachable_judge(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scratchllm.evaluate.judge.time.sleep", lambda s: None)
    path, _, _ = tiny
    base = ["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "o.jsonl"),
            "--device", "cpu", "--max-new-tokens", "2"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    missing_output = tmp_path / "m.json"
    missing_output.write_text(json.dumps([{"instruction": "x"}]))
    no_template = tmp_path / "plain"
    no_template.mkdir()
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        (no_template / f).write_bytes((path / f).read_bytes())
    good = tmp_path / "good.json"
    good.write_text(json.dumps(RECORDS[:1]))
    cases = [(base + ["--data", str(bad)], "is not valid JSON"),
             (base + ["--data", str(missing_output)], "neither 'messages' nor"),
             (["evaluate", "--checkpoint", str(no_template), "--out", str(tmp_path / "p.jsonl"),
               "--device", "cpu", "--data", str(good)], "--template"),
             (base + ["--data", str(good), "--judge-url", closed_port_url(), "--judge-model",
                      "j"], "127.0.0.1")]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and message in err
    # the response made before the judge failed was kept: a rerun only asks the judge
    records = read_results(tmp_path / "o.jsonl")
    assert len(records) == 1 and "judge_score" not in next(iter(records.values()))
