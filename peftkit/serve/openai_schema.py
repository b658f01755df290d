"""Pydantic models of the OpenAI-compatible endpoints, and OpenAI's error shape.

Types are strict (``"5"`` is not a number, ``"yes"`` not a boolean): a malformed body is a 422. OpenAI fields that
peftkit does not implement are refused with a 400 naming the field when they would change the answer (``n > 1``,
``logprobs``, ``tools``, ``response_format`` other than text, penalties, ...: ``UNSUPPORTED``), and ignored when
they would not (``user``, ``metadata``, ``store``, a zero penalty, ...), as is any field OpenAI does not know.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..tasks.schema import Text

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 1000  # a longer stop string cannot end an answer that fits a context; it only costs time

_off: Callable[[Any], bool] = lambda value: value in (None, False, 0, "", [], {})  # noqa: E731
#: OpenAI fields that change the answer and that peftkit does not implement: field -> (harmless values, why)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v in (None, 1), "one answer per request: send n requests instead (n > 1 is not supported)"),
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported: one answer per request"),
    "logprobs": (lambda v: v in (None, False), "logprobs are not supported by this server"),
    "top_logprobs": (_off, "top_logprobs are not supported by this server"),
    "echo": (_off, "echo is not supported: the prompt is not repeated in the answer"),
    "suffix": (_off, "suffix (insertion) is not supported"),
    "tools": (_off, "tools (function calling) are not supported by this server"),
    "tool_choice": (lambda v: v in (None, "none"), "tool_choice is not supported: this server calls no tools"),
    "functions": (_off, "functions (function calling) are not supported by this server"),
    "function_call": (lambda v: v in (None, "none"), "function_call is not supported: this server calls no functions"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "response_format other than {\"type\": \"text\"} is not supported (no JSON mode)"),
    "logit_bias": (_off, "logit_bias is not supported by this server"),
    "presence_penalty": (_off, "presence_penalty is not supported: send 0 or leave it out"),
    "frequency_penalty": (_off, "frequency_penalty is not supported: send 0 or leave it out"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class Generation(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extras: checked against UNSUPPORTED, else ignored

    model: Text = Field(description="an adapter's name, or 'base' for the plain base model", max_length=200)
    max_tokens: int | None = Field(None, ge=1, description="at most this many new tokens (default: the server's)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(None, description=f"up to {MAX_STOPS} strings that end the answer")
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1,
                             description="the same seed and request give the same sampled answer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="answers per request: only 1")

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has {longest} characters; at most {MAX_STOP_CHARS}")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field whose value asks for something this server does not do."""
        sent = {**(self.model_extra or {}), "n": self.n}
        for name, (harmless, why) in UNSUPPORTED.items():
            if name in sent and not harmless(sent[name]):
                return name, why
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(Generation):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="the text to continue, or its token ids (a list holds exactly one prompt)")

    def one_prompt(self) -> str | list[int]:
        """The prompt as a text or token ids; ValueError when the list does not hold exactly one."""
        value = self.prompt
        if isinstance(value, str):
            return value
        if len(value) == 1 and not isinstance(value[0], int):
            return value[0]
        if value and all(isinstance(v, int) for v in value):
            return value
        raise ValueError(f"one prompt per request (this list holds {len(value)}): send each prompt on its own")


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = {404: "model_not_found" if param == "model" else "not_found", 400: "bad_request", 405: "method_not_allowed",
            413: "request_too_large", 422: "invalid_body", 500: "internal_error"}.get(status)
    # messages may quote what the client sent: keep them encodable whatever it was
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
