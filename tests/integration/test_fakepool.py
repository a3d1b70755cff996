"""The fake vLLM pool speaks vLLM's schema over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from foveal.testing import FakePool, FakeScript, ServerThread

MODEL = "foveal-ref"


@pytest.fixture
def pool() -> FakePool:
    return FakePool(model=MODEL, visual_tokens=16, script=FakeScript(answer="the cat is black"))


@pytest.fixture
def server(pool: FakePool) -> Iterator[ServerThread]:
    with ServerThread(pool.app) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def png_data_uri(size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def post(
    http: aiohttp.ClientSession, server: ServerThread, body: dict[str, Any]
) -> tuple[int, Any]:
    async with http.post(server.url + "/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json(content_type=None)


def text_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "what colour is it"}], **extra}


async def test_text_request(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    status, body = await post(http, server, text_body(max_tokens=10, some_unknown_field=1))
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "the cat is black"}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert len(pool.requests) == 1 and pool.requests[0]["max_tokens"] == 10


async def test_image_request_counts_visual_tokens(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    content = [
        {"type": "text", "text": "describe both images"},
        {"type": "image_url", "image_url": {"url": png_data_uri()}},
        {"type": "image_url", "image_url": {"url": png_data_uri((20, 10))}},
    ]
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": content},
        ],
    }
    status, answer = await post(http, server, body)
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == 2 + 3 + 2 * 16


async def test_max_tokens_truncates_with_length_and_logprobs(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    pool.script.confidence = 0.5
    status, body = await post(http, server, text_body(max_tokens=2, logprobs=True, top_logprobs=2))
    assert status == 200
    choice = body["choices"][0]
    assert choice["message"]["content"] == "the cat"
    assert choice["finish_reason"] == "length"
    tokens = choice["logprobs"]["content"]
    assert [t["token"] for t in tokens] == ["the", " cat"]
    assert all(t["logprob"] == pytest.approx(math.log(0.5)) for t in tokens)
    assert len(tokens[0]["top_logprobs"]) == 2
    assert body["usage"]["completion_tokens"] == 2


async def test_wrong_model_is_404_like_vllm(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    status, body = await post(http, server, {**text_body(), "model": "other"})
    assert status == 404
    assert body == {
        "object": "error",
        "message": "The model `other` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    assert pool.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,!!!not-base64!!!",
        "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
        "data:text/plain;base64,aGVsbG8=",
        "http://127.0.0.1:1/cat.png",
    ],
)
async def test_bad_image_is_400(
    url: str, pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    status, body = await post(
        http, server, {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    )
    assert status == 400
    assert body["type"] == "BadRequestError" and body["code"] == 400
    assert body["object"] == "error" and body["message"]
    assert pool.requests == []


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        text_body(max_tokens=0),
        text_body(temperature=2.5),
        text_body(stream="maybe"),
    ],
    ids=["unknown-part", "no-messages", "bad-role", "no-model", "max-tokens", "temp", "stream"],
)
async def test_schema_violations_are_400(
    body: dict[str, Any], pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    status, answer = await post(http, server, body)
    assert status == 400
    assert answer["type"] == "BadRequestError" and answer["code"] == 400
    assert pool.requests == []


async def test_streaming_shape(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    body = text_body(stream=True, stream_options={"include_usage": True})
    async with http.post(server.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert words == ["the", " cat", " is", " black"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


async def test_streaming_without_usage_has_no_usage_chunk(
    server: ServerThread, http: aiohttp.ClientSession
) -> None:
    async with http.post(server.url + "/v1/chat/completions", json=text_body(stream=True)) as r:
        raw = (await r.read()).decode()
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_scripted_failures_then_success(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    pool.script.fail_status = 503
    pool.script.fail_times = 1
    status, body = await post(http, server, text_body())
    assert status == 503 and body["code"] == 503 and body["object"] == "error"
    status, _ = await post(http, server, text_body())
    assert status == 200


async def test_health_models_and_metrics(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.url + "/health") as resp:
        assert resp.status == 200
    pool.script.healthy = False
    async with http.get(server.url + "/health") as resp:
        assert resp.status == 503
    async with http.get(server.url + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    await post(http, server, text_body())
    async with http.get(server.url + "/metrics") as resp:
        text = await resp.text()
    assert 'vllm:num_requests_running{model_name="foveal-ref"} 0.0' in text
    assert "vllm:num_requests_waiting" in text
    assert 'vllm:generation_tokens_total{model_name="foveal-ref"} 4.0' in text
    assert 'vllm:prompt_tokens_total{model_name="foveal-ref"} 4.0' in text


async def test_client_disconnect_is_recorded(
    pool: FakePool, server: ServerThread, http: aiohttp.ClientSession
) -> None:
    pool.script.latency_s = 5.0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await post(http, server, text_body())
    await _until(lambda: pool.cancelled == 1)


async def test_openai_client_plain_and_streaming(pool: FakePool, server: ServerThread) -> None:
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is it"},
                        {"type": "image_url", "image_url": {"url": png_data_uri()}},
                    ],
                }
            ],
            max_tokens=16,
        )
        assert answer.choices[0].message.content == "the cat is black"
        assert answer.usage is not None and answer.usage.prompt_tokens == 3 + 16
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(parts) == "the cat is black"
        assert usage is not None and usage.completion_tokens == 4
    finally:
        await client.close()


def test_sync_openai_client_and_errors(pool: FakePool, server: ServerThread) -> None:
    import openai

    with OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == [MODEL]
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].finish_reason == "stop"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )


async def _until(predicate: Any, timeout_s: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
