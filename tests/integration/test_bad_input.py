"""Bad input over HTTP: OpenAI error JSON with the right status, nothing lost, nothing crashes."""

from __future__ import annotations

import base64
import io
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

from foveal.store import Store
from foveal.testing.images import image_message, png_data_uri
from foveal.testing.stack import LocalStack, running_stack


def bomb_png(width: int = 8000, height: int = 8000) -> bytes:
    """A tiny PNG whose header declares width x height (64 Mpx by default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    raw = zlib.compress(b"\x00" * (width * 3 + 1) * 8)  # a few rows: the header is the bomb
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture
async def small_stack() -> AsyncIterator[LocalStack]:
    async with running_stack(
        limits={
            "max_body_bytes": 200_000,
            "max_images": 2,
            "max_tokens_cap": 100,
            "max_image_pixels": 4_000_000,
        },
    ) as s:
        yield s


async def _post(
    stack: LocalStack, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession(stack.http_url) as http:
        async with http.post(
            "/v1/chat/completions",
            data=data,
            headers={"content-type": "application/json", **(headers or {})},
        ) as r:
            return r.status, await r.json(), r.headers


def _data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


CASES: dict[str, tuple[Any, int, str | None]] = {
    "malformed json": (b"{not json", 400, "invalid_json"),
    "missing messages": ({"model": "auto"}, 400, "missing_field"),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
        400,
        "unknown_content_part",
    ),
    "undecodable image": (
        {"messages": [image_message("hi", _data_uri(b"not an image at all"))]},
        400,
        "invalid_image",
    ),
    "truncated png": ({"messages": [image_message("hi", png_data_uri(300, 300)[:200])]}, 400, None),
    "pixel bomb": (
        {"messages": [image_message("hi", _data_uri(bomb_png()))]},
        400,
        "image_too_large",
    ),
    "too many images": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}] * 3,
                }
            ]
        },
        400,
        "too_many_images",
    ),
    "remote image url": (
        {"messages": [image_message("hi", "http://127.0.0.1:9/x.png")]},
        400,
        "image_url_not_allowed",
    ),
    "max_tokens above cap": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 101},
        400,
        "max_tokens_exceeded",
    ),
    "unknown model": (
        {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model_not_found",
    ),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    "empty messages": ({"messages": []}, 400, None),
    "body too large": (
        {"messages": [{"role": "user", "content": "x" * 300_000}]},
        413,
        "body_too_large",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_a_clear_openai_error(small_stack: LocalStack, case: str) -> None:
    body, status, code = CASES[case]
    raw = body if isinstance(body, bytes) else None
    got, payload, _ = await _post(small_stack, body, raw=raw)
    assert got == status, payload
    err = payload["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code
    # nothing reached a pool, and the server still answers a good request
    assert all(not p.pool.requests for pools in small_stack.pools.values() for p in pools)
    ok, _, _ = await _post(small_stack, {"messages": [{"role": "user", "content": "hi"}]})
    assert ok == 200


async def test_pixel_bomb_is_refused_from_its_header(small_stack: LocalStack) -> None:
    raw = bomb_png()
    assert len(raw) < 70_000  # a few KiB on the wire, 192 MB if decoded
    status, payload, _ = await _post(
        small_stack, {"messages": [image_message("hi", _data_uri(raw))]}
    )
    assert status == 400 and "8000x8000" in payload["error"]["message"].replace(" ", "")


async def test_auth_missing_and_invalid_keys_are_401() -> None:
    async with running_stack(auth={"enabled": True}) as stack:
        store = Store(stack.settings.store.url)
        try:
            key = store.create_api_key("acme")
        finally:
            store.close()
        body = {"messages": [{"role": "user", "content": "hi"}]}
        status, payload, _ = await _post(stack, body)
        assert status == 401 and payload["error"]["code"] == "missing_api_key"
        status, payload, _ = await _post(stack, body, headers={"authorization": "Bearer fvl_nope"})
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        status, _, headers = await _post(stack, body, headers={"authorization": f"Bearer {key}"})
        assert status == 200
        rid = headers["x-foveal-request-id"]
        # the decision belongs to acme: another tenant cannot read it
        store = Store(stack.settings.store.url)
        try:
            other = store.create_api_key("globex")
        finally:
            store.close()
        async with aiohttp.ClientSession(stack.http_url) as http:
            async with http.get(
                f"/v1/decisions/{rid}", headers={"authorization": f"Bearer {other}"}
            ) as resp:
                assert resp.status == 404
            async with http.get(
                f"/v1/decisions/{rid}", headers={"authorization": f"Bearer {key}"}
            ) as resp:
                assert resp.status == 200 and (await resp.json())["tenant"] == "acme"


async def test_tenant_cap_from_the_store() -> None:
    async with running_stack(auth={"enabled": True}) as stack:
        store = Store(stack.settings.store.url)
        try:
            key = store.create_api_key("small")
            store.set_tenant_cap("small", 8)
        finally:
            store.close()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
        status, payload, _ = await _post(stack, body, headers={"authorization": f"Bearer {key}"})
        assert status == 400 and "cap of 8" in payload["error"]["message"]


async def test_every_pool_of_a_tier_down_is_503_with_retry_after() -> None:
    async with running_stack(replicas=2) as stack:
        for p in stack.pools["t4"]:
            p.server.stop()
        status, payload, headers = await _post(
            stack, {"model": "t4", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert payload["error"]["type"] == "service_unavailable"


def test_bomb_png_really_declares_64_megapixels() -> None:
    with Image.open(io.BytesIO(bomb_png())) as im:
        assert im.size == (8000, 8000)
