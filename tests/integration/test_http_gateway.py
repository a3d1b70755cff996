"""The OpenAI-compatible gateway end to end: the real `openai` client, real servers on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
import openai
import pytest

from foveal.store import Store
from foveal.testing.images import image_message, png_data_uri
from foveal.testing.stack import LocalStack, running_stack


def _client(stack: LocalStack, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=key, max_retries=0)


async def _answered(stack: LocalStack, text: str) -> tuple[str, str]:
    """Ask one auto-routed image question; its request id and feedback token."""
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[image_message(text)]
        )
    return raw.headers["x-foveal-request-id"], raw.headers["x-foveal-feedback-token"]


async def test_chat_with_image_through_the_openai_client(stack: LocalStack) -> None:
    stack.pool("t256").pool.script.answer = "STOP"
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[image_message("Read the text on the sign")], max_tokens=16
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == "STOP"
    assert raw.headers["x-foveal-tier"] == "t256"  # a reading prompt goes to the top tier
    assert raw.headers["x-foveal-request-id"] == completion.id
    assert raw.headers["x-foveal-feedback-token"]
    assert completion.model == "t256"
    # the pool saw the image as a data URI and counted its visual tokens
    sent = stack.pool("t256").pool.requests[-1]
    assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png")
    assert completion.usage is not None and completion.usage.prompt_tokens >= 256


async def test_streaming_with_usage(stack: LocalStack) -> None:
    stack.pool("t16").pool.script.answer = "a red square on white"
    async with _client(stack) as client:
        stream = await client.chat.completions.create(
            model="auto",
            messages=[image_message("Describe the scene", png_data_uri(640, 480))],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert "".join(text) == "a red square on white"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 5


async def test_models_lists_auto_and_tiers_and_a_tier_name_pins(stack: LocalStack) -> None:
    async with _client(stack) as client:
        models = [m.id for m in (await client.models.list()).data]
        assert models == ["auto", "t1", "t4", "t16", "t64", "t256"]
        raw = await client.chat.completions.with_raw_response.create(
            model="t4", messages=[image_message("Read the text")]
        )
    assert raw.headers["x-foveal-tier"] == "t4"
    assert len(stack.pool("t4").pool.requests) == 1 and not stack.pool("t256").pool.requests


async def test_feedback_round_trip_and_decision_record(stack: LocalStack) -> None:
    rid, token = await _answered(stack, "what colour is it?")
    async with aiohttp.ClientSession(stack.http_url) as http:
        body = {"request_id": rid, "token": token, "score": 1.0}
        async with http.post("/v1/feedback", json=body) as resp:
            assert resp.status == 200, await resp.text()
        # committed: a second store instance (new connections) sees it at once
        other = Store(stack.settings.store.url)
        try:
            fb = other.get_feedback(rid)
        finally:
            other.close()
        assert fb is not None and fb.score == 1.0
        async with http.post("/v1/feedback", json=body) as resp:
            assert resp.status == 409
            assert (await resp.json())["error"]["type"] == "conflict_error"
        async with http.get(f"/v1/decisions/{rid}") as resp:
            record = await resp.json()
        assert resp.status == 200
        assert record["tier"] == "t1" and record["policy"] == "rules"
        assert record["reason"] == "general question" and record["propensity"] == 1.0
        assert record["outcome"] == "ok" and record["features"]["images"] == 1


@pytest.mark.parametrize(
    ("token", "status"),
    [("garbage", 403), ("expired", 403), ("other-request", 403)],
)
async def test_bad_feedback_tokens(stack: LocalStack, token: str, status: int) -> None:
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="t1", messages=[{"role": "user", "content": "hi"}]
        )
    rid = raw.headers["x-foveal-request-id"]
    tokens = stack.core.tokens
    value = {
        "garbage": "not-a-token",
        "expired": tokens.issue(rid, "default", now=time.time() - 10 * tokens.ttl_s),
        "other-request": tokens.issue("req_other", "default"),
    }[token]
    async with aiohttp.ClientSession(stack.http_url) as http:
        async with http.post(
            "/v1/feedback", json={"request_id": rid, "token": value, "score": 0.5}
        ) as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["param"] == "token"


async def test_decisions_survive_in_the_store(stack: LocalStack) -> None:
    async with _client(stack) as client:
        ids = []
        for _ in range(5):
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "hello"}]
            )
            ids.append(raw.headers["x-foveal-request-id"])
    await stack.core.writer.flush()
    store = Store(stack.settings.store.url)
    try:
        records = [store.get_decision(i) for i in ids]
    finally:
        store.close()
    assert all(r is not None and r.tier == "t1" and r.latency_ms > 0 for r in records)


async def test_fallback_when_a_pool_dies_mid_run(stack: LocalStack) -> None:
    async with _client(stack) as client:
        msg = [image_message("Describe the scene", png_data_uri(640, 480))]
        first = await client.chat.completions.with_raw_response.create(model="auto", messages=msg)
        assert first.headers["x-foveal-tier"] == "t16"
        stack.pool("t16").server.stop()
        second = await client.chat.completions.with_raw_response.create(model="auto", messages=msg)
        assert second.headers["x-foveal-tier"] == "t64"  # nearest higher tier
        # a pinned request never falls back: 503 with Retry-After
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="t16", messages=msg)
    assert err.value.status_code == 503
    assert int(err.value.response.headers["retry-after"]) >= 1
    record = await stack.core.explain(
        tenant="default", request_id=second.headers["x-foveal-request-id"]
    )
    assert record.chosen_tier == "t16" and record.tier == "t64"


async def test_pool_timeout_is_504() -> None:
    async with running_stack(pool_client={"request_timeout_s": 0.5}) as stack:
        stack.pool("t1").pool.script.latency_s = 5.0
        async with _client(stack) as client:
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                await client.chat.completions.create(
                    model="t1", messages=[{"role": "user", "content": "hi"}]
                )
            assert time.monotonic() - t0 < 4.0  # the deadline, not the pool, ended it
        assert err.value.status_code == 504
        stack.pool("t1").pool.script.latency_s = 0.0


async def test_client_disconnect_cancels_the_pool_request(stack: LocalStack) -> None:
    pool = stack.pool("t1").pool
    pool.script.latency_s = 3.0
    body = {"model": "t1", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(stack.http_url) as http:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.5):
                await http.post("/v1/chat/completions", json=body)
    for _ in range(50):
        if pool.cancelled:
            break
        await asyncio.sleep(0.05)
    assert pool.cancelled == 1
    pool.script.latency_s = 0.0


async def test_metrics_pass_promtool(stack: LocalStack) -> None:
    async with _client(stack) as client:
        await client.chat.completions.create(model="auto", messages=[image_message("read it")])
    async with aiohttp.ClientSession(stack.http_url) as http:
        async with http.get("/metrics") as resp:
            text = await resp.text()
    assert 'foveal_router_requests_total{edge="http",outcome="ok",tier="t256"}' in text
    assert "foveal_router_decision_duration_seconds_bucket" in text
    check = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_health_and_readiness(stack: LocalStack) -> None:
    async with aiohttp.ClientSession(stack.http_url) as http:
        async with http.get("/healthz") as resp:
            assert resp.status == 200
        async with http.get("/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["available_endpoints"]["t16"] == 1


@pytest.mark.postgres
async def test_request_path_on_postgresql(postgres_url: str) -> None:
    async with running_stack(store_url=postgres_url) as stack:
        rid, token = await _answered(stack, "Read the label")
        async with aiohttp.ClientSession(stack.http_url) as http:
            body = {"request_id": rid, "token": token, "score": 0.25}
            async with http.post("/v1/feedback", json=body) as resp:
                assert resp.status == 200
            async with http.post("/v1/feedback", json=body) as resp:
                assert resp.status == 409
        await stack.core.writer.flush()
    store = Store(postgres_url)
    try:
        decision, feedback = store.get_decision(rid), store.get_feedback(rid)
    finally:
        store.close()
    assert decision is not None and decision.tier == "t256" and decision.outcome == "ok"
    assert feedback is not None and feedback.score == 0.25


async def test_stream_disconnect_cancels_the_pool_and_is_recorded(stack: LocalStack) -> None:
    pool = stack.pool("t1").pool
    pool.script.answer = "one two three four five six"
    pool.script.chunk_delay_s = 0.3
    body = {"model": "t1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(stack.http_url) as http:
        resp = await http.post("/v1/chat/completions", json=body)
        rid = resp.headers["x-foveal-request-id"]
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        resp.close()  # the client goes away mid-stream
    for _ in range(60):
        if pool.cancelled:
            break
        await asyncio.sleep(0.05)
    assert pool.cancelled == 1
    record = await stack.core.explain(tenant="default", request_id=rid)
    assert record.outcome == "cancelled"
    pool.script.chunk_delay_s = 0.0
