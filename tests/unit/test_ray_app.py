"""The Ray runtime's parts that need no Ray: tier parsing, autoscaling settings, the ASGI relay."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from foveal.pools.ray_app import (
    Message,
    RayAutoscaling,
    RayPoolConfig,
    RayTier,
    call_asgi,
    parse_tiers,
)
from foveal.testing import FakePool, FakeScript


def test_tiers_parse_from_names() -> None:
    tiers = parse_tiers(" t1, t16,t256 ")
    assert tiers == (RayTier("t1", 1), RayTier("t16", 16), RayTier("t256", 256))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no tiers given"),
        ("t1,x16", "tier 'x16': expected tN"),
        ("t0", "tier 't0': expected tN"),
        ("t4,t4", "tiers given twice: t4"),
    ],
)
def test_bad_tier_lists_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tiers(text)


def test_autoscaling_config_and_threads() -> None:
    scale = RayAutoscaling(min_replicas=0, max_replicas=3, target_ongoing_requests=4, num_cpus=2.5)
    assert scale.autoscaling_config() == {
        "min_replicas": 0,
        "initial_replicas": 1,  # a tier starts warm even when it may sleep later
        "max_replicas": 3,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 3.0,
        "downscale_delay_s": 60.0,
    }
    assert scale.torch_threads == 2
    assert RayAutoscaling(num_cpus=0.2).torch_threads == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, r"max_replicas \(2\) must be >= 1 and >= min"),
        ({"max_replicas": 0, "min_replicas": 0}, "max_replicas"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
        ({"num_cpus": 0}, "num_cpus must be > 0"),
        ({"max_ongoing_requests": 0}, "max_ongoing_requests must be >= 1"),
    ],
)
def test_bad_autoscaling_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RayAutoscaling(**fields)


def test_config_endpoints_and_checks() -> None:
    config = RayPoolConfig(tiers=parse_tiers("t1,t16"), port=8123)
    assert config.endpoints() == {
        "t1": "http://127.0.0.1:8123/t1",
        "t16": "http://127.0.0.1:8123/t16",
    }
    with pytest.raises(ValueError, match="Ray Serve needs a fixed port"):
        RayPoolConfig(tiers=parse_tiers("t1"), port=0)
    with pytest.raises(ValueError, match="at least one tier"):
        RayPoolConfig(tiers=())
    with pytest.raises(ValueError, match="tier name 'T1'"):
        RayTier("T1", 1)


def scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": None,
        "server": None,
    }


async def relay(app: Any, body: dict[str, Any]) -> list[Message]:
    return [
        m async for m in call_asgi(app, scope("/v1/chat/completions"), json.dumps(body).encode())
    ]


async def test_relay_carries_whole_and_streamed_answers() -> None:
    pool = FakePool(script=FakeScript(answer="one two"))
    body = {"model": "foveal-ref", "messages": [{"role": "user", "content": "hi"}]}
    (start, *chunks) = await relay(pool.app, body)
    assert start[0] == "start" and start[1] == 200
    answer = json.loads(b"".join(c[1] for c in chunks))
    assert answer["choices"][0]["message"]["content"] == "one two"
    (start, *chunks) = await relay(pool.app, {**body, "stream": True})
    sse = b"".join(c[1] for c in chunks).decode()
    assert start[1] == 200 and sse.count("data: ") == 5 and sse.endswith("data: [DONE]\n\n")
    (start, *chunks) = await relay(pool.app, {**body, "model": "other"})
    assert start[1] == 404 and b"does not exist" in b"".join(c[1] for c in chunks)


async def test_a_caller_that_stops_reading_disconnects_the_app() -> None:
    pool = FakePool(script=FakeScript(latency_s=5.0))
    body = {"model": "foveal-ref", "messages": [{"role": "user", "content": "hi"}]}
    stream = call_asgi(pool.app, scope("/v1/chat/completions"), json.dumps(body).encode())
    task = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stream.aclose()
    for _ in range(100):
        if pool.cancelled:
            break
        await asyncio.sleep(0.01)
    assert pool.cancelled == 1  # the app saw the client go away and stopped
