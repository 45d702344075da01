"""OpenAI's wire format: request models (validated strictly), error bodies, response bodies and
streaming chunks for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- requests --------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool (ints still pass as floats); unknown
    # fields are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    """stream_options: a last chunk with the usage counts."""

    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise ApiError(400, "prompt is empty: give a text or token ids", "prompt")
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    """A content part of a message (text only)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message of a conversation; `developer` is read as `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The message as the templates read it: role and plain text."""
        content = self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id such as cmpl-3f2a..."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]],
             created: int | None = None, **extra: Any) -> dict[str, Any]:
    """A response or chunk body: id, object, created, model, choices (and e.g. usage)."""
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, **extra}


def models_list(name: str, created: int) -> dict[str, Any]:
    """GET /v1/models."""
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "scratchllm"}]}
