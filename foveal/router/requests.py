"""The internal request: both edges parse their wire types into these exactly once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ChatRequest", "ImagePart", "Message", "RawImage", "TextPart", "image_question"]


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """A validated image: its header was read, its pixel count checked, its data decoded."""

    data_uri: str  # what the pool receives (`data:image/png;base64,...`)
    mime: str
    width: int
    height: int
    nbytes: int
    # small square preview from the edge's validation decode (foveal.router.features reads it)
    preview: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True, slots=True)
class RawImage:
    """An image as an edge received it, before validation: a URL (data: or http(s):) or bytes."""

    url: str | None = None
    data: bytes | None = None
    mime: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    parts: tuple[TextPart | ImagePart, ...]

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class ChatRequest:
    request_id: str
    tenant: str
    model: str  # "auto" or a tier name (a pin)
    messages: tuple[Message, ...]
    max_tokens: int
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int | None = None
    seed: int | None = None
    session_id: str | None = None
    edge: str = "http"
    received_at: float = field(default_factory=time.perf_counter)

    @property
    def images(self) -> list[ImagePart]:
        return [p for m in self.messages for p in m.parts if isinstance(p, ImagePart)]

    @property
    def prompt_text(self) -> str:
        """The text of the user turns, newest last."""
        return "\n".join(m.text for m in self.messages if m.role == "user")

    @property
    def turn_index(self) -> int:
        return sum(1 for m in self.messages if m.role == "user") - 1

    @property
    def pinned(self) -> bool:
        return self.model != "auto"


def image_question(
    part: ImagePart, question: str, *, request_id: str, tenant: str, max_tokens: int = 16
) -> ChatRequest:
    """An auto-routed one-turn request: one validated image and a question (training rows,
    benchmarks and replays build the request a client would have sent)."""
    return ChatRequest(
        request_id=request_id,
        tenant=tenant,
        model="auto",
        messages=(Message("user", (part, TextPart(question))),),
        max_tokens=max_tokens,
    )
