"""PoolClient against real fake pools over loopback: retries, breakers, fallback, deadlines."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import REGISTRY

from foveal.config import PoolClientSettings
from foveal.errors import InvalidRequest, NoEligiblePool, PoolError, PoolTimeout
from foveal.pools import Catalog, CatalogHolder, Endpoint, PoolClient, Tier
from foveal.testing import FakePool, FakeScript, ServerThread

MODEL = "foveal-ref"
PAYLOAD: dict[str, Any] = {"messages": [{"role": "user", "content": "what is it"}]}

Spec = dict[str, list[str]]
MakeClient = Callable[..., Awaitable[PoolClient]]


def catalog(spec: Spec) -> Catalog:
    return Catalog(
        tuple(
            Tier(
                name=name,
                visual_tokens=int(name[1:]),
                cost_weight=float(name[1:]),
                backend="fake",
                model=MODEL,
                endpoints=tuple(Endpoint(url, MODEL) for url in urls),
            )
            for name, urls in spec.items()
        )
    )


def dead_url() -> str:
    """A loopback URL nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def serve() -> Iterator[Callable[[FakePool], ServerThread]]:
    started: list[ServerThread] = []

    def start(pool: FakePool) -> ServerThread:
        server = ServerThread(pool.app).start()
        started.append(server)
        return server

    yield start
    with ThreadPoolExecutor(max_workers=max(1, len(started))) as ex:
        list(ex.map(lambda s: s.stop(), started))


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[PoolClient] = []

    async def make(spec: Spec | CatalogHolder, **overrides: Any) -> PoolClient:
        options: dict[str, Any] = {
            "connect_timeout_s": 0.5,
            "breaker_failures": 2,
            "breaker_reset_s": 30.0,
            "health_interval_s": 60.0,
            "health_timeout_s": 0.5,
            **overrides,
        }
        holder = spec if isinstance(spec, CatalogHolder) else CatalogHolder(catalog(spec))
        client = PoolClient(holder, PoolClientSettings(**options))
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_complete_round_trip(serve: Any, make_client: MakeClient) -> None:
    pool = FakePool(script=FakeScript(answer="a red square"))
    server = serve(pool)
    client = await make_client({"t4": [server.url]})
    payload = {**PAYLOAD, "max_tokens": 8}
    before = metric("foveal_pool_request_duration_seconds_count", tier="t4")
    result = await client.complete(["t4"], payload, deadline=deadline())
    assert result.tier == "t4" and result.endpoint == server.url and result.attempts == 1
    assert result.body["choices"][0]["message"]["content"] == "a red square"
    assert result.latency_s > 0
    assert pool.requests == [{**payload, "model": MODEL}]
    assert "model" not in payload  # the caller's dict is untouched
    assert metric("foveal_pool_request_duration_seconds_count", tier="t4") == before + 1
    assert client.endpoint_state(server.url).inflight == 0


async def test_stream_round_trip(serve: Any, make_client: MakeClient) -> None:
    pool = FakePool(script=FakeScript(answer="one two three"))
    server = serve(pool)
    client = await make_client({"t16": [server.url]})
    payload = {**PAYLOAD, "stream": True, "stream_options": {"include_usage": True}}
    stream = await client.stream(["t16"], payload, deadline=deadline())
    assert stream.tier == "t16" and stream.endpoint == server.url and stream.attempts == 1
    chunks = [chunk async for chunk in stream]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert stream.pool_seconds > 0
    assert pool.requests[0]["model"] == MODEL and pool.requests[0]["stream"] is True
    await stream.aclose()
    assert client.endpoint_state(server.url).inflight == 0
    assert pool.cancelled == 0


async def test_round_robin_between_idle_endpoints(serve: Any, make_client: MakeClient) -> None:
    a, b = FakePool(), FakePool()
    client = await make_client({"t4": [serve(a).url, serve(b).url]})
    for _ in range(4):
        await client.complete(["t4"], PAYLOAD, deadline=deadline())
    assert len(a.requests) == 2 and len(b.requests) == 2


async def test_least_in_flight_first(serve: Any, make_client: MakeClient) -> None:
    slow = FakePool(script=FakeScript(latency_s=0.5))
    fast = FakePool()
    client = await make_client({"t4": [serve(slow).url, serve(fast).url]})
    pending = asyncio.create_task(client.complete(["t4"], PAYLOAD, deadline=deadline()))
    await until(lambda: len(slow.requests) == 1)
    for _ in range(3):  # the slow endpoint is busy: every request goes to the idle one
        await client.complete(["t4"], PAYLOAD, deadline=deadline())
    assert len(fast.requests) == 3 and len(slow.requests) == 1
    pending.cancel()


async def test_retry_on_another_endpoint_and_breaker_skips_the_dead_one(
    serve: Any, make_client: MakeClient
) -> None:
    pool = FakePool()
    live, dead = serve(pool).url, dead_url()
    client = await make_client({"t4": [dead, live]}, breaker_failures=2)
    errors_before = metric("foveal_pool_errors_total", tier="t4", kind="connect")
    attempts = []
    for _ in range(6):
        result = await client.complete(["t4"], PAYLOAD, deadline=deadline())
        assert result.endpoint == live
        attempts.append(result.attempts)
    # round-robin puts the dead endpoint first on every other request until its breaker opens
    assert attempts == [2, 1, 2, 1, 1, 1]
    assert client.endpoint_state(dead).breaker.state == "open"
    assert client.available("t4") == 1
    assert metric("foveal_pool_errors_total", tier="t4", kind="connect") == errors_before + 2
    assert metric("foveal_pool_endpoints_available", tier="t4") == 1


async def test_fallback_to_next_tier(serve: Any, make_client: MakeClient) -> None:
    pool = FakePool(model=MODEL)
    client = await make_client({"t4": [dead_url(), dead_url()], "t16": [serve(pool).url]})
    result = await client.complete(["t4", "t16"], PAYLOAD, deadline=deadline())
    assert result.tier == "t16" and result.attempts == 3
    stream = await client.stream(["t4", "t16"], {**PAYLOAD, "stream": True}, deadline=deadline())
    async with stream:
        assert stream.tier == "t16"
        assert [c async for c in stream]


async def test_all_down_is_no_eligible_pool_without_waiting(make_client: MakeClient) -> None:
    client = await make_client(
        {"t4": [dead_url()], "t16": [dead_url()]}, breaker_failures=1, breaker_reset_s=7.0
    )
    started = time.monotonic()
    with pytest.raises(NoEligiblePool) as info:
        await client.complete(["t4", "t16"], PAYLOAD, deadline=deadline(30))
    assert time.monotonic() - started < 10  # refused connections fail fast; no deadline wait
    assert "t4" in info.value.message and "t16" in info.value.message
    assert info.value.retry_after_s is not None and 6.0 <= info.value.retry_after_s <= 7.0
    # both breakers are open now: the next request makes no network call at all
    assert client.available("t4") == 0 and client.available("t16") == 0
    with pytest.raises(NoEligiblePool) as again:
        await client.stream(["t4", "t16"], {**PAYLOAD, "stream": True}, deadline=deadline(30))
    assert "no endpoint available" in again.value.message


async def test_slow_pool_beyond_deadline_times_out(serve: Any, make_client: MakeClient) -> None:
    slow = FakePool(script=FakeScript(latency_s=5.0))
    other = FakePool()
    client = await make_client({"t4": [serve(slow).url], "t16": [serve(other).url]})
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        await client.complete(["t4", "t16"], PAYLOAD, deadline=deadline(0.3))
    assert time.monotonic() - started < 3
    assert other.requests == []  # the deadline was spent: no fallback
    await until(lambda: slow.cancelled == 1)  # the timed-out request was closed upstream
    with pytest.raises(PoolTimeout):
        await client.complete(["t4"], PAYLOAD, deadline=time.monotonic() - 1)


async def test_stream_past_the_deadline_times_out(serve: Any, make_client: MakeClient) -> None:
    pool = FakePool(script=FakeScript(answer="w " * 50, chunk_delay_s=0.1))
    url = serve(pool).url
    client = await make_client({"t4": [url]})
    stream = await client.stream(["t4"], {**PAYLOAD, "stream": True}, deadline=deadline(0.35))
    got = 0
    with pytest.raises(PoolTimeout):
        async for _ in stream:
            got += 1
    assert 1 <= got < 50
    await until(lambda: pool.cancelled == 1, timeout_s=3)
    state = client.endpoint_state(url)
    assert state.inflight == 0 and state.breaker.consecutive_failures == 0


async def test_pool_400_is_invalid_request_without_retry(
    serve: Any, make_client: MakeClient
) -> None:
    a = FakePool(script=FakeScript(fail_status=400))
    b = FakePool(script=FakeScript(fail_status=400))
    c = FakePool()
    client = await make_client({"t4": [serve(a).url, serve(b).url], "t16": [serve(c).url]})
    with pytest.raises(InvalidRequest) as info:
        await client.complete(["t4", "t16"], PAYLOAD, deadline=deadline())
    assert "Injected failure" in info.value.message
    assert len(a.requests) + len(b.requests) == 1 and c.requests == []
    assert client.available("t4") == 2  # the request was at fault, not the endpoints


async def test_503_then_success_on_retry(serve: Any, make_client: MakeClient) -> None:
    pool = FakePool(script=FakeScript(fail_status=503, fail_times=1))
    urls = [serve(pool).url, serve(pool).url]  # two replicas of one scripted pool
    client = await make_client({"t4": urls})
    errors_before = metric("foveal_pool_errors_total", tier="t4", kind="status")
    result = await client.complete(["t4"], PAYLOAD, deadline=deadline())
    assert result.attempts == 2 and len(pool.requests) == 2
    failures = sorted(client.endpoint_state(u).breaker.consecutive_failures for u in urls)
    assert failures == [0, 1]
    assert metric("foveal_pool_errors_total", tier="t4", kind="status") == errors_before + 1


async def test_429_moves_on_without_breaker_failure(serve: Any, make_client: MakeClient) -> None:
    busy = FakePool(script=FakeScript(fail_status=429))
    ok = FakePool()
    busy_url = serve(busy).url
    client = await make_client({"t4": [busy_url, serve(ok).url]}, breaker_failures=1)
    for _ in range(4):
        result = await client.complete(["t4"], PAYLOAD, deadline=deadline())
        assert result.endpoint != busy_url
    assert len(busy.requests) == 2  # still tried: a 429 does not open the breaker
    assert client.endpoint_state(busy_url).breaker.state == "closed"


async def test_invalid_json_is_a_protocol_failure(serve: Any, make_client: MakeClient) -> None:
    async def garbage(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{not json"})

    bad = ServerThread(garbage, lifespan="off").start()
    try:
        pool = FakePool()
        client = await make_client({"t4": [bad.url], "t16": [serve(pool).url]})
        result = await client.complete(["t4", "t16"], PAYLOAD, deadline=deadline())
        assert result.tier == "t16" and result.attempts == 2
        assert client.endpoint_state(bad.url).breaker.consecutive_failures == 1
    finally:
        bad.stop()


async def test_health_checks_mark_unhealthy_and_recover(
    serve: Any, make_client: MakeClient
) -> None:
    sick = FakePool(script=FakeScript(healthy=False))
    well = FakePool()
    sick_url = serve(sick).url
    client = await make_client({"t4": [sick_url, serve(well).url]}, health_interval_s=0.05)
    await until(lambda: client.available("t4") == 1)
    assert metric("foveal_pool_endpoints_available", tier="t4") == 1
    for _ in range(4):
        assert (await client.complete(["t4"], PAYLOAD, deadline=deadline())).endpoint != sick_url
    assert sick.requests == []
    sick.script.healthy = True
    await until(lambda: client.available("t4") == 2)
    await until(lambda: metric("foveal_pool_endpoints_available", tier="t4") == 2)


async def test_cancellation_closes_the_upstream_request(
    serve: Any, make_client: MakeClient
) -> None:
    pool = FakePool(script=FakeScript(latency_s=10.0))
    url = serve(pool).url
    client = await make_client({"t4": [url]})
    task = asyncio.create_task(client.complete(["t4"], PAYLOAD, deadline=deadline(30)))
    await until(lambda: len(pool.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: pool.cancelled == 1, timeout_s=3)
    state = client.endpoint_state(url)
    assert state.inflight == 0 and state.breaker.state == "closed"


async def test_stream_aclose_closes_the_upstream(serve: Any, make_client: MakeClient) -> None:
    pool = FakePool(script=FakeScript(answer="w " * 200, chunk_delay_s=0.05))
    url = serve(pool).url
    client = await make_client({"t4": [url]})
    stream = await client.stream(["t4"], {**PAYLOAD, "stream": True}, deadline=deadline())
    it = aiter(stream)
    await anext(it)
    await anext(it)
    await stream.aclose()
    await until(lambda: pool.cancelled == 1, timeout_s=3)
    assert client.endpoint_state(url).inflight == 0
    assert [c async for c in stream] == []


async def test_cancelled_stream_reader_closes_the_upstream(
    serve: Any, make_client: MakeClient
) -> None:
    pool = FakePool(script=FakeScript(answer="w " * 200, chunk_delay_s=0.05))
    url = serve(pool).url
    client = await make_client({"t4": [url]})
    stream = await client.stream(["t4"], {**PAYLOAD, "stream": True}, deadline=deadline())

    async def consume() -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: pool.cancelled == 1, timeout_s=3)
    assert stream.finished and client.endpoint_state(url).inflight == 0


async def test_stream_broken_by_server_death_raises_pool_error(
    serve: Any, make_client: MakeClient
) -> None:
    pool = FakePool(script=FakeScript(answer="w " * 500, chunk_delay_s=0.02))
    server = ServerThread(pool.app).start()
    try:
        client = await make_client({"t4": [server.url]}, breaker_failures=1)
        stream = await client.stream(["t4"], {**PAYLOAD, "stream": True}, deadline=deadline())
        got = 0
        with pytest.raises(PoolError):
            async for _ in stream:
                got += 1
                if got == 3:
                    await asyncio.to_thread(server.stop)
        assert 3 <= got < 500
        state = client.endpoint_state(server.url)
        assert state.inflight == 0 and state.breaker.state == "open"
    finally:
        server.stop()
    # the pool comes back on the same port
    again = ServerThread(pool.app, port=server.port).start()
    try:
        assert again.url == server.url
    finally:
        again.stop()


async def test_catalog_swap_keeps_breaker_state(serve: Any, make_client: MakeClient) -> None:
    live, dead = serve(FakePool()).url, dead_url()
    holder = CatalogHolder(catalog({"t4": [dead, live]}))
    client = await make_client(holder, breaker_failures=1)
    first = await client.complete(["t4"], PAYLOAD, deadline=deadline())
    assert first.attempts == 2  # the dead endpoint failed once: its breaker opened
    newcomer = serve(FakePool()).url
    holder.replace(catalog({"t4": [dead, live, newcomer], "t16": [newcomer]}))
    assert client.endpoint_state(dead).breaker.state == "open"
    assert client.available("t4") == 2 and client.available("t16") == 1
    for _ in range(3):
        assert (await client.complete(["t4"], PAYLOAD, deadline=deadline())).attempts == 1
    await client.check_health()  # a health round keeps the state of endpoints that stay
    assert client.endpoint_state(dead).breaker.state == "open"
