"""Score responses with an LLM judge behind any OpenAI-compatible chat/completions endpoint.

The prompt is the book's chapter-7 one (0-100, "Respond with the integer number only."). A judge
does not always obey, so `parse_score` takes the first integer of the reply and treats a
missing or out-of-range number as invalid (None) instead of failing.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from scratchllm.errors import UserError

SCORE_MIN, SCORE_MAX = 0, 100
_INTEGER = re.compile(r"[-+]?\d+")


def judge_prompt(prompt: str, reference: str, response: str) -> str:
    """The book's scoring prompt for one example (prompt = instruction plus input)."""
    return (f"Given the input `{prompt}` and correct output `{reference}`, "
            f"score the model response `{response}` on a scale from 0 to 100, "
            "where 100 is the best score. Respond with the integer number only.")


def parse_score(reply: str | None) -> int | None:
    """The first integer in a judge's reply if it lies in 0-100, else None (invalid)."""
    match = _INTEGER.search(reply or "")
    if match is None:
        return None
    score = int(match.group())
    return score if SCORE_MIN <= score <= SCORE_MAX else None


@dataclass
class JudgeClient:
    """A chat/completions client (temperature 0) that retries connection and server errors."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 2  # extra attempts after the first, for connection errors and HTTP 5xx
    backoff: float = 1.0  # seconds before the first retry, doubled for each further one
    calls: int = 0  # requests sent (answered or not), for reports and tests

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise UserError(f"--judge-url {self.url!r} must start with http:// or https://, "
                            "e.g. http://localhost:11434/v1")
        if not self.model:
            raise UserError("a judge needs a model name: pass --judge-model")

    @property
    def endpoint(self) -> str:
        """The chat/completions address under the base URL."""
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def chat(self, content: str) -> str:
        """The judge's reply to one user message."""
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": content}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.calls += 1
            request = urllib.request.Request(self.endpoint, data=body, headers=headers,
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    raw = answer.read()
            except urllib.error.HTTPError as e:
                detail = _snippet(e.read() if e.fp else b"")
                last = f"HTTP {e.code}{': ' + detail if detail else ''}"
                if e.code < 500 and e.code != 429:  # the request itself is wrong: no retry
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
                continue
            return _content(raw, self.endpoint)
        raise UserError(f"judge at {self.endpoint} failed after {attempt + 1} attempt(s) "
                        f"({last}): check --judge-url, --judge-model and that the server runs")

    def score(self, prompt: str, reference: str, response: str) -> tuple[int | None, str]:
        """(score or None when invalid, the raw reply) for one example."""
        reply = self.chat(judge_prompt(prompt, reference, response))
        return parse_score(reply), reply


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _content(raw: bytes, endpoint: str) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"judge at {endpoint} did not answer in the OpenAI chat format "
                        f"({_snippet(raw, 120)!r}): point --judge-url at an OpenAI-compatible "
                        "/v1 base URL") from e
    return content if isinstance(content, str) else ""
