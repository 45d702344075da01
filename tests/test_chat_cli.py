"""`scratchllm chat` on hand-made checkpoints: --prompt mode by subprocess, the interactive
mode through a real pseudo-terminal (pexpect), and bad input -> one-line errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from scratchllm.data.chat import CHAT_SPECIALS, ensure_special_tokens
from scratchllm.model import GPT, GPTConfig
from scratchllm.model.resize import grow_vocab
from scratchllm.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n0123456789"
ENV = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_checkpoint(path: Path, logits: dict[str, float], context_length: int = 64,
                    template: str | None = "chat", chat_tokens: bool = True) -> Path:
    """A checkpoint whose next-token logits are fixed: `logits` by token text, -30 elsewhere.

    The final norm's weight is zero and its bias one-hot, so every position's hidden state is
    the same vector and the (untied) lm_head's first column is the logits.
    """
    tok = CharTokenizer.train([TEXT])
    if chat_tokens:
        tok = ensure_special_tokens(tok, CHAT_SPECIALS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size - len(CHAT_SPECIALS) * chat_tokens,
                          context_length=context_length, n_layer=1, n_head=2, n_embd=32,
                          tie_embeddings=False))
    grow_vocab(model, tok.vocab_size)
    column = torch.full((tok.vocab_size,), -30.0)
    for text, value in logits.items():
        ids = [tok.special_tokens[text]] if text in tok.special_tokens else tok.encode(text)
        column[ids[0]] = value
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = column
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    if template is not None:
        (path / "template.json").write_text(json.dumps({"template": template}) + "\n")
    return path


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """Replies of a's and b's that end at <|end|> after a few tokens."""
    return make_checkpoint(tmp_path_factory.mktemp("short"), {"a": 6.0, "b": 6.0, "<|end|>": 4.0})


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """Replies that never end by themselves (the end token is all but impossible)."""
    return make_checkpoint(tmp_path_factory.mktemp("endless"), {"a": 0.0, "b": 0.0})


def run_chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchllm", "chat", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=120)


def spawn_chat(*args: str):
    child = pexpect.spawn(sys.executable, ["-m", "scratchllm", "chat", *args], cwd=str(REPO),
                          env=ENV, encoding="utf-8", timeout=60, dimensions=(24, 200))
    child.expect_exact("you> ")
    return child


# ---- --prompt: one answer, only the reply on stdout --------------------------------------------


def test_prompt_mode_prints_only_the_reply(short):
    result = run_chat("--checkpoint", str(short), "--prompt", "hello", "--seed", "1",
                      "--max-new-tokens", "200", "--system", "be brief")
    assert result.returncode == 0, result.stderr
    reply = result.stdout
    assert re.fullmatch(r"[ab]*\n", reply), reply  # stopped at <|end|>, never ran on
    assert len(reply) < 200
    again = run_chat("--checkpoint", str(short), "--prompt", "hello", "--seed", "1",
                     "--max-new-tokens", "200", "--system", "be brief")
    assert again.stdout == reply  # seeded: the same reply


def test_reply_stops_at_any_turn_marker(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", {"a": 5.0, "<|user|>": 9.0})
    result = run_chat("--checkpoint", str(ckpt), "--prompt", "hi", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n"  # the fake next turn was never printed


def test_alpaca_template_from_the_command_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", {"a": 6.0, "<|endoftext|>": 5.0}, 256,
                           template=None, chat_tokens=False)
    result = run_chat("--checkpoint", str(ckpt), "--template", "alpaca", "--prompt", "hi",
                      "--seed", "0", "--max-new-tokens", "100")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"a*\n", result.stdout)


# ---- bad input ---------------------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_template_is_one_line(short):
    line = one_line_error(run_chat("--checkpoint", str(short), "--template", "chatt",
                                   "--prompt", "hi"))
    assert "unknown template 'chatt'" in line and "did you mean 'chat'" in line


def test_base_model_without_template_asks_for_one(tmp_path):
    ckpt = make_checkpoint(tmp_path / "base", {"a": 1.0}, template=None, chat_tokens=False)
    line = one_line_error(run_chat("--checkpoint", str(ckpt), "--prompt", "hi"))
    assert "--template" in line
    line = one_line_error(run_chat("--checkpoint", str(ckpt), "--template", "chat",
                                   "--prompt", "hi"))
    assert "special tokens" in line  # a base tokenizer lacks <|user|> etc.


def test_missing_checkpoint_and_long_message_are_one_line(short, tmp_path):
    one_line_error(run_chat("--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi"))
    line = one_line_error(run_chat("--checkpoint", str(short), "--prompt", "x" * 100))
    assert "shorten" in line


# ---- interactive, through a pseudo-terminal ----------------------------------------------------


def test_interactive_session(short):
    child = spawn_chat("--checkpoint", str(short), "--seed", "3", "--max-new-tokens", "6")
    child.sendline("hello")
    child.expect(r"assistant> ([ab]*)\r\n")
    child.expect_exact("you> ")
    child.sendline("/system answer in a and b")
    child.expect_exact("[system message set]")
    child.expect_exact("you> ")
    child.sendline("again")
    child.expect(r"assistant> [ab]*\r\n")
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("[conversation cleared]")
    child.expect_exact("you> ")
    child.sendline("x" * 100)  # longer than the context: an error, the session goes on
    child.expect_exact("error: the message makes a")
    child.expect_exact("you> ")
    child.sendline("/nope")
    child.expect_exact("[unknown command /nope")
    child.expect_exact("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_old_turns_are_dropped_with_a_note(short):
    child = spawn_chat("--checkpoint", str(short), "--seed", "0", "--max-new-tokens", "8")
    notes = 0
    for _ in range(4):
        child.sendline("tell me something nice")
        index = child.expect([r"dropped the oldest \d+ exchange", r"assistant> [ab]*\r\n"])
        if index == 0:
            notes += 1
            child.expect(r"assistant> [ab]*\r\n")
        child.expect_exact("you> ")
    assert notes >= 1
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_keeps_the_session(endless):
    child = spawn_chat("--checkpoint", str(endless), "--temperature", "2",
                       "--max-new-tokens", "1000000")
    child.sendline("go on forever")
    child.expect(r"assistant> [ab]{50}")  # streaming
    child.sendintr()
    # The reply streams fast: search only the newest output, and allow a loaded machine time.
    child.expect_exact("[stopped]", timeout=180, searchwindowsize=4096)
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("[conversation cleared]")
    child.expect_exact("you> ")
    child.sendintr()  # at the prompt: a clean exit
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
