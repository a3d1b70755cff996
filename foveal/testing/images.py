"""Small images and OpenAI messages for tests, examples and benchmarks."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

__all__ = ["image_message", "png_data_uri"]


def png_data_uri(
    width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 30)
) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, uri: str | None = None) -> dict[str, Any]:
    """A user message with a text part and an image part (a small PNG unless ``uri``)."""
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": uri or png_data_uri()}},
        ],
    }
