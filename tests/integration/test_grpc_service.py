"""The gRPC edge end to end: a real grpc.aio server over a real core and fake pools, called
through the checked-in stubs."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from foveal.api.v1 import router_pb2 as pb
from foveal.api.v1 import router_pb2_grpc as pb_grpc
from foveal.errors import PoolError, RateLimited
from foveal.router.grpc_service import start_grpc_server
from foveal.router.requests import ChatRequest
from foveal.router.results import ChatDelta
from foveal.testing.stack import LocalStack, running_stack

TIERS = {"t1", "t4", "t16", "t64", "t256"}


def _png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _request(text: str = "what colour is this?", *, image: bytes | None = None, **kw: Any):
    content = [pb.ContentPart(text=text)]
    if image is not None:
        content.append(pb.ContentPart(image=pb.Image(data=image, mime_type="image/png")))
    return pb.ChatRequest(messages=[pb.Message(role="user", content=content)], **kw)


def _md(metadata: Any) -> dict[str, str]:
    return {k: v for k, v in metadata or ()}


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    async with running_stack() as s:
        yield s


@pytest.fixture
async def stub(stack: LocalStack) -> AsyncIterator[pb_grpc.RouterStub]:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        yield pb_grpc.RouterStub(channel)


async def _explain(stub: pb_grpc.RouterStub, request_id: str, **kw: Any) -> pb.DecisionRecord:
    """The record once the decision is in the store (written in small batches)."""
    for _ in range(100):
        record = await stub.Explain(pb.ExplainRequest(request_id=request_id), **kw)
        if record.HasField("created_at") or record.outcome != "ok":
            return record
        await asyncio.sleep(0.02)
    return record


async def test_unary_chat_with_text_and_image(stub: pb_grpc.RouterStub) -> None:
    call = stub.Chat(_request(image=_png(), max_tokens=16, temperature=0.5, seed=7))
    headers = _md(await call.initial_metadata())
    resp = await call
    assert resp.request_id.startswith("req_")
    assert resp.tier in TIERS and resp.model == resp.tier
    assert resp.content == "a fake answer"
    assert resp.finish_reason == "stop"
    assert resp.created > 0
    assert resp.usage.completion_tokens == 3
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 3
    assert resp.feedback_token
    assert headers["x-foveal-request-id"] == resp.request_id
    assert headers["x-foveal-tier"] == resp.tier
    assert headers["x-foveal-feedback-token"] == resp.feedback_token


async def test_the_pool_receives_what_the_client_sent(
    stack: LocalStack, stub: pb_grpc.RouterStub
) -> None:
    resp = await stub.Chat(
        _request(
            image=_png(),
            model="t64",
            max_tokens=2,
            temperature=0.7,
            top_p=0.9,
            stop=["END"],
            logprobs=True,
            top_logprobs=2,
            seed=3,
        )
    )
    assert resp.tier == "t64"
    assert resp.finish_reason == "length"  # 3 words, max_tokens=2
    assert len(resp.logprobs.fields["content"].list_value.values) == 2
    body = stack.pool("t64").pool.requests[-1]
    assert body["max_tokens"] == 2
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert (body["stop"], body["logprobs"], body["top_logprobs"], body["seed"]) == (
        ["END"],
        True,
        2,
        3,
    )
    parts = body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "what colour is this?"}
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


async def test_streaming_chat(stub: pb_grpc.RouterStub) -> None:
    call = stub.ChatStream(_request(image=_png()))
    headers = _md(await call.initial_metadata())
    chunks = [chunk async for chunk in call]
    assert await call.code() == grpc.StatusCode.OK
    first = chunks[0]
    assert first.tier in TIERS
    for chunk in chunks:
        assert (chunk.request_id, chunk.tier, chunk.feedback_token, chunk.model) == (
            first.request_id,
            first.tier,
            first.feedback_token,
            first.tier,
        )
    assert "".join(c.delta for c in chunks) == "a fake answer"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    usage = [c.usage for c in chunks if c.HasField("usage")]
    assert len(usage) == 1 and usage[0].completion_tokens == 3
    assert headers["x-foveal-request-id"] == first.request_id
    assert headers["x-foveal-tier"] == first.tier
    assert headers["x-foveal-feedback-token"] == first.feedback_token


async def test_feedback_round_trip(stub: pb_grpc.RouterStub) -> None:
    resp = await stub.Chat(_request())
    fb = pb.FeedbackRequest(request_id=resp.request_id, token=resp.feedback_token, score=1.0)
    assert (await stub.Feedback(fb)).accepted is True
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.Feedback(fb)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS

    other = await stub.Chat(_request())
    forged = pb.FeedbackRequest(request_id=other.request_id, token=resp.feedback_token, score=1)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Feedback(forged)
    assert bad.value.code() not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL)
    out_of_range = pb.FeedbackRequest(
        request_id=other.request_id, token=other.feedback_token, score=2.0
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Feedback(out_of_range)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_explain_returns_the_recorded_decision(stub: pb_grpc.RouterStub) -> None:
    resp = await stub.Chat(_request(image=_png(), session_id="s-9"))
    record = await _explain(stub, resp.request_id)
    assert record.request_id == resp.request_id
    assert record.tenant == "default"
    assert record.tier == resp.tier and record.chosen_tier
    assert record.requested_model == "auto"
    assert record.policy and record.reason
    assert 0 < record.propensity <= 1
    assert record.outcome == "ok" and record.error == ""
    assert record.edge == "grpc"
    assert record.HasField("latency_ms") and record.latency_ms > 0
    assert record.prompt_tokens == resp.usage.prompt_tokens
    assert record.completion_tokens == resp.usage.completion_tokens
    assert record.HasField("created_at")
    features = json_format.MessageToDict(record.features)
    assert features["images"] == 1
    assert features["image_sizes"] == [[64, 48]]

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Explain(pb.ExplainRequest(request_id="req_does_not_exist"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (_request(image=b"not an image at all"), grpc.StatusCode.INVALID_ARGUMENT),
        (_request(model="t9999"), grpc.StatusCode.NOT_FOUND),
        (pb.ChatRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.ChatRequest(messages=[pb.Message(role="user", content=[pb.ContentPart()])]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (_request(temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT),
        (_request(max_tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["undecodable-image", "unknown-model", "no-messages", "empty-part", "temp", "max-tokens"],
)
async def test_bad_input(stub: pb_grpc.RouterStub, request_: pb.ChatRequest, code: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Chat(request_)
    assert unary.value.code() == code
    assert unary.value.details()
    assert "Traceback" not in unary.value.details()
    call = stub.ChatStream(request_)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in call:
            pass
    assert streamed.value.code() == code


async def test_auth() -> None:
    async with running_stack(auth={"enabled": True}) as stack:
        store = stack.core.store
        acme = await asyncio.to_thread(store.create_api_key, "acme")
        globex = await asyncio.to_thread(store.create_api_key, "globex")
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            stub = pb_grpc.RouterStub(channel)
            for metadata in (None, (("authorization", "Bearer fvl_wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stub.Chat(_request(), metadata=metadata)
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    async for _ in stub.ChatStream(_request(), metadata=metadata):
                        pass
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stub.Explain(pb.ExplainRequest(request_id="x"), metadata=metadata)
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

            as_acme = (("authorization", f"Bearer {acme}"),)
            resp = await stub.Chat(_request(), metadata=as_acme)
            record = await _explain(stub, resp.request_id, metadata=(("x-api-key", acme),))
            assert record.tenant == "acme"
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await stub.Explain(
                    pb.ExplainRequest(request_id=resp.request_id),
                    metadata=(("authorization", f"Bearer {globex}"),),
                )
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            fb = pb.FeedbackRequest(request_id=resp.request_id, token=resp.feedback_token, score=1)
            with pytest.raises(grpc.aio.AioRpcError) as no_key:
                await stub.Feedback(fb)
            assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await stub.Feedback(fb, metadata=as_acme)).accepted


async def test_health_and_reflection(stack: LocalStack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "foveal.v1.Router"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service

        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="foveal.v1.Router")
        )
        await call.done_writing()
        listed, found = [r async for r in call]
        names = {s.name for s in listed.list_services_response.service}
        assert {"foveal.v1.Router", "grpc.health.v1.Health"} <= names
        files = found.file_descriptor_response.file_descriptor_proto
        assert files and b"foveal/v1/router.proto" in files[0]


async def test_client_cancelling_a_stream(stack: LocalStack, stub: pb_grpc.RouterStub) -> None:
    for tier in TIERS:
        script = stack.pool(tier).pool.script
        script.answer = " ".join(f"w{i}" for i in range(200))
        script.chunk_delay_s = 0.05
    call = stub.ChatStream(_request(max_tokens=200))
    first = await call.read()
    second = await call.read()
    assert first.request_id and second.delta
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED

    pool = stack.pool(first.tier).pool
    for _ in range(200):  # the router closes its pool request
        if pool.cancelled:
            break
        await asyncio.sleep(0.02)
    assert pool.cancelled == 1
    record = await _explain(stub, first.request_id)
    assert record.outcome == "cancelled"

    for tier in TIERS:
        stack.pool(tier).pool.script.chunk_delay_s = 0.0
    resp = await stub.Chat(_request(max_tokens=200))  # the server carries on
    assert resp.finish_reason == "stop"
    assert len(await asyncio.wait_for(_collect(stub), timeout=10)) > 1


async def _collect(stub: pb_grpc.RouterStub) -> list[pb.ChatChunk]:
    return [c async for c in stub.ChatStream(_request(max_tokens=200))]


# ---- the servicer's error paths, over a real server with a scripted core ----------------------


class _Stream:
    def __init__(self, deltas: list[ChatDelta | Exception], hang: bool) -> None:
        self.request_id, self.tier, self.feedback_token, self.model, self.created = (
            "req_s",
            "t4",
            "tok",
            "t4",
            1,
        )
        self._deltas, self._hang = deltas, hang
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[ChatDelta]:
        for item in self._deltas:
            if isinstance(item, Exception):
                raise item
            yield item
        if self._hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed.set()


class _ScriptedCore:
    """A core whose answer depends on the requested model."""

    def __init__(self) -> None:
        self.streams: list[_Stream] = []

    async def authenticate(self, api_key: str | None) -> str:
        return "t"

    async def build_request(self, **kw: Any) -> ChatRequest:
        return ChatRequest("req_s", kw["tenant"], kw["model"], (), 1, stream=kw["stream"])

    async def chat(self, req: ChatRequest) -> Any:
        if req.model == "busy":
            raise RateLimited("slow down", retry_after_s=2.4)
        raise RuntimeError("secret detail")

    async def chat_stream(self, req: ChatRequest) -> _Stream:
        if req.model == "hang":
            stream = _Stream([ChatDelta(content="x")], hang=True)
        else:
            stream = _Stream([ChatDelta(content="x"), PoolError("pool went away")], hang=False)
        self.streams.append(stream)
        return stream


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[_ScriptedCore, pb_grpc.RouterStub]]:
    core = _ScriptedCore()
    server, port = await start_grpc_server(core, "127.0.0.1", 0, max_message_bytes=2**20)  # type: ignore[arg-type]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield core, pb_grpc.RouterStub(channel)
    finally:
        await server.stop(grace=None)


async def test_unexpected_errors_are_internal_and_logged(
    scripted: tuple[_ScriptedCore, pb_grpc.RouterStub], caplog: pytest.LogCaptureFixture
) -> None:
    _, stub = scripted
    with caplog.at_level(logging.ERROR, logger="foveal.router.grpc_service"):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Chat(_request(model="boom"))
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "internal error"
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


async def test_rate_limit_carries_retry_after(
    scripted: tuple[_ScriptedCore, pb_grpc.RouterStub],
) -> None:
    _, stub = scripted
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await stub.Chat(_request(model="busy"))
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.value.details() == "slow down"
    assert _md(limited.value.trailing_metadata())["retry-after"] == "2"


async def test_error_mid_stream_ends_with_its_status(
    scripted: tuple[_ScriptedCore, pb_grpc.RouterStub],
) -> None:
    core, stub = scripted
    call = stub.ChatStream(_request())
    assert (await call.read()).delta == "x"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call.read()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "pool went away"
    assert core.streams[-1].closed.is_set()


async def test_cancel_closes_the_core_stream(
    scripted: tuple[_ScriptedCore, pb_grpc.RouterStub],
) -> None:
    core, stub = scripted
    call = stub.ChatStream(_request(model="hang"))
    assert (await call.read()).delta == "x"
    call.cancel()
    await asyncio.wait_for(core.streams[-1].closed.wait(), timeout=5)
