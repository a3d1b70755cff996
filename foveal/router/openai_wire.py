"""The OpenAI chat-completions wire format: parse a request body, render results and chunks."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from foveal.errors import InvalidRequest
from foveal.router.parsing import RawMessage
from foveal.router.requests import RawImage
from foveal.router.results import ChatDelta, ChatResult, Usage

__all__ = [
    "ChatCompletionBody",
    "load_json_object",
    "parse_body",
    "render_chunk",
    "render_result",
    "to_raw_messages",
]


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _WireMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Any] | None = None


class ChatCompletionBody(BaseModel):
    """The fields Foveal reads; other OpenAI fields are accepted and ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: str = "auto"
    messages: list[_WireMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    seed: int | None = None
    n: int = Field(1, description="Only 1 is supported.")
    user: str | None = None


def load_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return data


def parse_body(raw: bytes) -> ChatCompletionBody:
    data = load_json_object(raw)
    if "messages" not in data:
        raise InvalidRequest("`messages` is required", param="messages", code="missing_field")
    try:
        body = ChatCompletionBody.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(x) for x in err["loc"])
        raise InvalidRequest(f"{param}: {err['msg']}", param=param) from None
    if body.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    return body


def to_raw_messages(body: ChatCompletionBody) -> list[RawMessage]:
    out: list[RawMessage] = []
    for i, msg in enumerate(body.messages):
        if msg.content is None:
            raise InvalidRequest("message content is required", param=f"messages[{i}].content")
        if isinstance(msg.content, str):
            out.append((msg.role, [msg.content]))
            continue
        parts: list[str | RawImage] = []
        for j, part in enumerate(msg.content):
            parts.append(_part(part, f"messages[{i}].content[{j}]"))
        out.append((msg.role, parts))
    return out


def _part(part: Any, param: str) -> str | RawImage:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest("a text part needs a string `text`", param=f"{param}.text")
        return text
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise InvalidRequest(
                "an image_url part needs `image_url.url`", param=f"{param}.image_url"
            )
        return RawImage(url=url)
    raise InvalidRequest(
        f"unknown content part type {kind!r}; supported: 'text', 'image_url'",
        param=f"{param}.type",
        code="unknown_content_part",
    )


def _usage(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def render_result(result: ChatResult) -> dict[str, Any]:
    return {
        "id": result.request_id,
        "object": "chat.completion",
        "created": result.created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.content},
                "logprobs": result.logprobs,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": _usage(result.usage),
    }


def render_chunk(
    request_id: str,
    model: str,
    created: int,
    delta: ChatDelta | None,
    *,
    role: Literal["assistant"] | None = None,
    usage_only: bool = False,
) -> bytes:
    """One SSE event for a chunk (``delta=None`` with ``role`` makes the opening chunk)."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if usage_only:
        chunk["choices"] = []
        chunk["usage"] = _usage(delta.usage if delta else None)
    else:
        out_delta: dict[str, Any] = {}
        if role:
            out_delta["role"] = role
        if delta is not None and delta.content:
            out_delta["content"] = delta.content
        elif role:
            out_delta["content"] = ""
        chunk["choices"] = [
            {
                "index": 0,
                "delta": out_delta,
                "logprobs": delta.logprobs if delta else None,
                "finish_reason": delta.finish_reason if delta else None,
            }
        ]
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
