"""The OpenAI chat-completions request schema a pool accepts (the parts Foveal uses).

Shared by the reference pool server and the vLLM-schema test fake; each declares its own
message model (the fake mirrors vLLM's stricter roles) on top of these parts and parameters.
Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ChatParams(BaseModel):
    """Everything of a chat request except its messages."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = None
    stop: str | list[str] | None = None
