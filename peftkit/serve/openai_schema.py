"""Pydantic models of the OpenAI-compatible endpoints (the request fields peftkit honours; other fields that
OpenAI clients may send are accepted and ignored), and OpenAI's error shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..tasks.schema import Text

MAX_STOPS = 4  # as OpenAI


class Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(description="an adapter's name, or 'base' for the plain base model", max_length=200)
    max_tokens: int | None = Field(None, ge=1, description="at most this many new tokens (default: the server's)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} strings that end the answer")
    seed: int | None = Field(None, description="the same seed and request give the same sampled answer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return stops


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(Generation):
    prompt: str | list[str] = Field(description="the text to continue (a list holds one text)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a list of exactly one string)")
            value = value[0]
        return value


Generation.model_rebuild()


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {404: "invalid_request_error", 413: "invalid_request_error", 500: "server_error"}.get(
        status, "invalid_request_error")
    code = {404: "model_not_found" if param == "model" else "not_found", 400: "bad_request",
            413: "request_too_large", 422: "invalid_body", 500: "internal_error"}.get(status)
    # messages may quote what the client sent: keep them encodable whatever it was
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
