"""Request and response shapes of the OpenAI-compatible API, and OpenAI-style error bodies.

Requests are validated strictly (``"5"`` is not an int, ``true`` is not a number) so a wrong type
is a 400 rather than a silent guess; unknown fields are ignored the way OpenAI-compatible
servers ignore them. ``session`` / ``fork_from`` / ``top_k`` / ``repetition_penalty`` are
extensions, like ``ignore_eos`` (the ``openai`` client sends them with ``extra_body``).
"""
from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SESSION_ID = 256
MAX_STOP = 4


class APIError(Exception):
    """An error the client caused (or a limit it hit), turned into an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def __reduce__(self):  # keyword arguments: pickled explicitly (it crosses to the HTTP process)
        return _api_error, (self.status, self.message, self.type, self.param, self.code, self.headers)


def _api_error(status, message, type, param, code, headers) -> APIError:
    return APIError(status, message, type=type, param=param, code=code, headers=headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str, param: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"): valid JSON, not valid Unicode. It cannot be encoded
    to UTF-8, so the tokenizer (a 500 from deep inside) and a state file's metadata (a session that
    never saves, a shutdown flush that stops halfway) would fail on it: refused at the door."""
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(f"{param} is not valid Unicode: a lone surrogate {found.group()!a} at character "
                         f"{found.start()} (send UTF-8 text)")
    return text


def check_session_id(value: str | None, param: str) -> str | None:
    """A session id is an opaque string, never a path: printable, bounded, nothing else is required."""
    if value is None:
        return None
    if not value:
        raise ValueError(f"{param} must be a non-empty string")
    if len(value) > MAX_SESSION_ID:
        raise ValueError(f"{param} is longer than {MAX_SESSION_ID} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{param} must not contain control characters (NUL, newline, ...)")
    return check_unicode(value, param)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    session: str | None = None
    fork_from: str | None = None
    ignore_eos: bool = False  # as vLLM: generate max_tokens whatever comes (benchmarks)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be up to {MAX_STOP} non-empty strings")
        return stops

    @field_validator("session", "fork_from")
    @classmethod
    def _session_ids(cls, v, info):
        return check_session_id(v, info.field_name)

    def new_tokens(self, default: int) -> int:
        for v in (self.max_completion_tokens, self.max_tokens):
            if v is not None:
                return v
        return default

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    # left to right, ids before strings: pydantic's default "smart" union also tried a 32k-id list as
    # list[str], collecting an error per element (8 ms on the event loop, stalling every stream)
    prompt: Union[str, list[int], list[str]] = Field(default="", union_mode="left_to_right")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported (a list of one string is fine)")
            return check_unicode(v[0], "prompt")
        if isinstance(v, str):
            return check_unicode(v, "prompt")
        if isinstance(v, list) and v and min(v) < 0:
            raise ValueError("token ids must be >= 0")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return check_unicode(self.content, "content")
        parts = []
        for part in self.content:  # OpenAI content parts: only text parts make sense here
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("message content parts must be {'type': 'text', 'text': ...}")
            parts.append(part["text"])
        return check_unicode("".join(parts), "content")


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def render_plain_chat(messages: list[dict], continuing: bool) -> str:
    """The documented plain template for models without a chat template:

        User: <content>\\n            (System: / Assistant: likewise)
        Assistant:                   (the generation prompt; the reply follows)

    A request continuing a session starts with a newline, ending the previous reply's line."""
    lines = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return ("\n" if continuing else "") + lines + "Assistant:"


PLAIN_CHAT_STOP = "\nUser:"
