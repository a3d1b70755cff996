"""The router's pool client against vLLM tiers deployed per the tier -> vLLM mapping.

vLLM cannot serve a VLM on this CPU machine, so each tier is the vLLM-schema fake configured as
the mapping says a GPU cluster runs it: served under the mapping's model name, with the tier's
visual tokens per image, and reached through the catalog entry the mapping writes for the
router. What the generic pool-client and fake tests already check (retries, breakers,
deadlines, error shapes) is not repeated here; this is what a vLLM tier adds: the served name
round trip, per-tier usage, logprobs the router reads confidence from, and the ``vllm:*`` load
gauges.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from foveal.config import PoolClientSettings, Settings
from foveal.errors import InvalidRequest
from foveal.pools import Catalog, CatalogHolder, PoolClient
from foveal.pools.vllm import VllmTier, catalog_entry, reference_vllm_tiers
from foveal.testing import FakePool, FakeScript, ServerThread
from foveal.testing.images import image_message

QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
QUESTION = "what colour is the square"  # 5 words: the fake counts one prompt token per word


@dataclass
class VllmTierServer:
    tier: VllmTier
    pool: FakePool
    server: ServerThread


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, VllmTierServer]]:
    """One vLLM-schema server per reference tier, configured by the mapping."""
    started: dict[str, VllmTierServer] = {}
    try:
        for tier in reference_vllm_tiers(QWEN):
            pool = FakePool(model=tier.served_name, visual_tokens=tier.visual_tokens)
            started[tier.name] = VllmTierServer(tier, pool, ServerThread(pool.app).start())
        yield started
    finally:
        with ThreadPoolExecutor(max_workers=max(1, len(started))) as ex:
            list(ex.map(lambda s: s.server.stop(), started.values()))


@pytest.fixture
def fresh(tiers: dict[str, VllmTierServer]) -> dict[str, VllmTierServer]:
    """The module's servers with their scripts and records reset for one test."""
    for t in tiers.values():
        t.pool.script = FakeScript(answer="it is red")
        t.pool.requests.clear()
    return tiers


@pytest.fixture
async def client(fresh: dict[str, VllmTierServer]) -> AsyncIterator[PoolClient]:
    entries = [catalog_entry(t.tier, [t.server.url]) for t in fresh.values()]
    catalog = Catalog.from_settings(Settings(tiers=entries).tiers)
    settings = PoolClientSettings(health_interval_s=60.0, connect_timeout_s=0.5)
    async with PoolClient(CatalogHolder(catalog), settings) as pool_client:
        yield pool_client


def deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def ask(**extra: Any) -> dict[str, Any]:
    return {"messages": [image_message(QUESTION)], "max_tokens": 8, **extra}


async def test_each_tier_is_billed_its_own_visual_tokens(
    client: PoolClient, fresh: dict[str, VllmTierServer]
) -> None:
    for name, t in fresh.items():
        result = await client.complete([name], ask(), deadline=deadline())
        assert result.tier == name and result.endpoint == t.server.url
        usage = result.body["usage"]
        assert usage["prompt_tokens"] == 5 + t.tier.visual_tokens, name
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # the router sent the name the mapping serves the model under, and vLLM answers with it
        assert [r["model"] for r in t.pool.requests] == [QWEN]
        assert result.body["model"] == QWEN


async def test_logprobs_carry_the_answer_confidence(
    client: PoolClient, fresh: dict[str, VllmTierServer]
) -> None:
    fresh["t64"].pool.script.confidence = 0.25
    result = await client.complete(["t64"], ask(logprobs=True, top_logprobs=3), deadline=deadline())
    (choice,) = result.body["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"] == "it is red"
    assert all(math.isclose(c["logprob"], math.log(0.25)) for c in content)
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    assert content[0]["top_logprobs"][0]["token"] == content[0]["token"]
    without = await client.complete(["t64"], ask(), deadline=deadline())
    assert without.body["choices"][0]["logprobs"] is None


async def test_stream_with_logprobs_and_usage(
    client: PoolClient, fresh: dict[str, VllmTierServer]
) -> None:
    payload = ask(stream=True, stream_options={"include_usage": True}, logprobs=True)
    async with await client.stream(["t256"], payload, deadline=deadline()) as stream:
        chunks = [chunk async for chunk in stream]
    assert stream.tier == "t256"
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(d["delta"].get("content", "") for d in deltas)
    assert text == "it is red"
    scored = [d["logprobs"]["content"][0]["token"] for d in deltas if d["logprobs"]]
    assert "".join(scored) == text  # every content token carries its logprob
    assert deltas[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 5 + 256
    assert fresh["t256"].pool.requests[0]["model"] == QWEN


async def test_each_server_lists_the_name_the_router_sends(
    client: PoolClient, fresh: dict[str, VllmTierServer]
) -> None:
    async with aiohttp.ClientSession() as http:
        for t in fresh.values():
            async with http.get(t.server.url + "/v1/models") as resp:
                listed = [m["id"] for m in (await resp.json())["data"]]
            entry = catalog_entry(t.tier, [t.server.url])
            assert listed == [entry.model] == [QWEN]


async def test_a_tier_serving_another_name_fails_loudly(fresh: dict[str, VllmTierServer]) -> None:
    """A catalog out of step with the servers is a clear 404 from vLLM, not a silent retry."""
    t = fresh["t16"]
    wrong = VllmTier(name="t16", visual_tokens=16, model=QWEN, served_model_name="qwen-vl")
    catalog = Catalog.from_settings([catalog_entry(wrong, [t.server.url])])
    async with PoolClient(CatalogHolder(catalog), PoolClientSettings()) as pool_client:
        with pytest.raises(InvalidRequest, match="The model `qwen-vl` does not exist"):
            await pool_client.complete(["t16"], ask(), deadline=deadline())
        assert pool_client.available("t16") == 1  # the endpoint itself is fine


async def test_an_unhealthy_tier_falls_back_to_the_next_budget(
    client: PoolClient, fresh: dict[str, VllmTierServer]
) -> None:
    fresh["t16"].pool.script.healthy = False  # vLLM's /health answers 503 while unhealthy
    await client.check_health()
    assert client.available("t16") == 0 and client.available("t64") == 1
    result = await client.complete(["t16", "t64"], ask(), deadline=deadline())
    assert result.tier == "t64"
    assert result.body["usage"]["prompt_tokens"] == 5 + 64  # billed at the tier that answered
    assert fresh["t16"].pool.requests == []
    fresh["t16"].pool.script.healthy = True
    await client.check_health()
    assert client.available("t16") == 1


def gauges(text: str) -> dict[tuple[str, str], float]:
    """``(metric, model_name) -> value`` of every vllm:* sample."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:"):
                found[(sample.name, sample.labels.get("model_name", ""))] = sample.value
    return found


async def test_vllm_load_gauges_show_a_request_in_flight(
    client: PoolClient, fresh: dict[str, VllmTierServer]
) -> None:
    t = fresh["t4"]
    t.pool.script.latency_s = 0.5
    async with aiohttp.ClientSession() as http:

        async def scrape() -> dict[tuple[str, str], float]:
            async with http.get(t.server.url + "/metrics") as resp:
                assert resp.status == 200
                return gauges(await resp.text())

        before = await scrape()
        assert before[("vllm:num_requests_running", QWEN)] == 0
        assert ("vllm:num_requests_waiting", QWEN) in before
        task = asyncio.create_task(client.complete(["t4"], ask(), deadline=deadline()))
        end = time.monotonic() + 5
        while (await scrape())[("vllm:num_requests_running", QWEN)] != 1:
            assert time.monotonic() < end, "the running gauge never showed the request"
            await asyncio.sleep(0.02)
        await task
        after = await scrape()
    assert after[("vllm:num_requests_running", QWEN)] == 0
    prompt = after[("vllm:prompt_tokens_total", QWEN)] - before[("vllm:prompt_tokens_total", QWEN)]
    assert prompt == 5 + 4
