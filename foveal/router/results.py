"""What the core hands back to the edges (internal types; each edge renders its own wire form)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ChatDelta", "ChatResult", "ChatStream", "Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage | None:
        if not usage:
            return None
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        return cls(prompt, completion, int(usage.get("total_tokens") or prompt + completion))


@dataclass(frozen=True, slots=True)
class ChatResult:
    request_id: str
    tier: str  # the tier that answered
    feedback_token: str
    model: str  # what the response's `model` field says (the answering tier)
    created: int
    content: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: dict[str, Any] | None = None  # the pool's OpenAI `logprobs` object, when asked


@dataclass(frozen=True, slots=True)
class ChatDelta:
    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None  # only on the last delta
    logprobs: dict[str, Any] | None = None


class ChatStream(Protocol):
    """A streamed answer. Known before the first delta: request id, tier, feedback token."""

    request_id: str
    tier: str
    feedback_token: str
    model: str
    created: int

    def __aiter__(self) -> AsyncIterator[ChatDelta]: ...

    async def aclose(self) -> None: ...
