"""The wire format: OpenAI's chat-completions request, response, stream chunks and error JSON.

Requests follow ``POST /v1/chat/completions`` of the OpenAI API: ``messages`` with
``system`` / ``user`` / ``assistant`` roles, content as a string or as parts
``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}``.
Supported parameters: ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, ``n`` (1 only), ``stream``, ``stream_options``. Extensions:
``insert_layer`` (force k), ``lam`` / ``budget`` (for routers trained for them). Unknown
fields are refused (400), so a typo never silently changes the answer.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
(:class:`APIError`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from deepinsert.errors import InputError
from deepinsert.utils.extras import require

pydantic = require("pydantic", "serve")
from pydantic import BaseModel, ConfigDict, Field


class APIError(InputError):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error JSON."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    """``{"url": "data:image/png;base64,..." | "https://...", "detail": ...}``."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    """``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    """``{"include_usage": true}`` adds a last chunk with ``usage``."""

    include_usage: bool = False


class ChatRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (OpenAI's fields we honour, plus extensions)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    # deepinsert extensions
    insert_layer: int | None = Field(default=None, ge=0, strict=True)  # an int, not "3" or true
    lam: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False, strict=True)
    budget: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False, strict=True)

    def check_supported(self) -> None:
        """Refuse parameters we accept syntactically but cannot honour (400, naming the parameter)."""
        if self.n is not None and self.n != 1:
            raise APIError(f"n={self.n} is not supported: this server returns one choice (n=1)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                raise APIError(f"{name} is not supported (only 0)", param=name)
        if self.logprobs:
            raise APIError("logprobs are not supported", param="logprobs")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError("stop must be at most 4 non-empty strings", param="stop")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError("give max_tokens or max_completion_tokens, not two different values", param="max_tokens")

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (None when neither is given)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int],
                    extra: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice, ``usage`` and the ``deepinsert`` extension."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(created or time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
        "deepinsert": extra,
    }


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice (``extra`` adds top-level fields)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}
