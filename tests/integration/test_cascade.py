"""Cascade: a low-confidence answer is asked again one tier higher. Confidence arithmetic on
OpenAI logprobs objects, then the whole path through the real gateway over fake pools that
report per-token log-probabilities like vLLM."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from foveal.router.cascade import answer_confidence, higher_tiers
from foveal.router.tenant_policy import TenantPolicy
from foveal.testing.images import image_message
from foveal.testing.stack import LocalStack, running_stack

COLOUR = [image_message("what colour is it?")]  # the rule policy: a general question -> t1
NAMES = ["t1", "t4", "t16", "t64", "t256"]


def _body(logprobs: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"content": "x"}, "logprobs": logprobs}]}


def _tokens(*lps: float) -> dict[str, Any]:
    return {"content": [{"token": "w", "logprob": lp, "bytes": [119]} for lp in lps]}


# -- arithmetic ---------------------------------------------------------------------------------


def test_confidence_is_the_geometric_mean_token_probability() -> None:
    conf = answer_confidence(_body(_tokens(math.log(0.9), math.log(0.4))))
    assert conf == pytest.approx(math.sqrt(0.9 * 0.4))
    assert answer_confidence(_body(_tokens(0.0, 0.0))) == 1.0
    assert answer_confidence(_body(_tokens(-math.inf, 0.0))) == 0.0


@pytest.mark.parametrize(
    "body",
    [
        _body(None),  # the pool ignored logprobs
        _body({"content": []}),  # an empty answer
        _body({"content": [{"token": "w"}]}),  # no logprob in the entry
        _body(_tokens(float("nan"))),
        {"choices": []},
        {},
    ],
)
def test_no_usable_logprobs_means_no_confidence(body: dict[str, Any]) -> None:
    assert answer_confidence(body) is None


def test_escalation_goes_up_through_the_allowed_tiers_only() -> None:
    everyone = TenantPolicy(source="test")
    assert higher_tiers("t4", NAMES, everyone) == ["t16", "t64", "t256"]
    assert higher_tiers("t256", NAMES, everyone) == []
    some = TenantPolicy(source="test", allowed_tiers=("t1", "t64"))
    assert higher_tiers("t1", NAMES, some) == ["t64"]
    assert higher_tiers("t99", NAMES, some) == []


# -- through the gateway ------------------------------------------------------------------------


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    async with running_stack(tenant_policy={"cascade": {"threshold": 0.5}}) as s:
        for tier, local in s.pools.items():
            local[0].pool.script.answer = f"answer from {tier}"
        yield s


def _client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


async def _record(stack: LocalStack, rid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.http_url}/v1/decisions/{rid}") as r:
        assert r.status == 200
        record: dict[str, Any] = await r.json()
        return record


async def test_an_unsure_answer_is_asked_again_one_tier_up(stack: LocalStack) -> None:
    stack.pool("t1").pool.script.confidence = 0.3
    stack.pool("t4").pool.script.confidence = 0.9
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=COLOUR)
    completion = raw.parse()
    assert raw.headers["x-foveal-tier"] == "t4" and completion.model == "t4"
    assert completion.choices[0].message.content == "answer from t4"
    assert completion.choices[0].logprobs is None  # the client did not ask for them
    first, second = stack.pool("t1").pool.requests, stack.pool("t4").pool.requests
    assert len(first) == 1 and len(second) == 1
    assert first[0]["logprobs"] is True and second[0]["logprobs"] is True
    record = await _record(stack, raw.headers["x-foveal-request-id"])
    assert record["chosen_tier"] == "t1" and record["tier"] == "t4"
    assert record["cost"] == 1.0 + 4.0  # both answers are paid for
    cascade = record["features"]["cascade"]
    assert cascade["first_tier"] == "t1" and cascade["escalated_to"] == "t4"
    assert cascade["confidence"] == pytest.approx(0.3) and cascade["threshold"] == 0.5
    assert [s["tier"] for s in cascade["steps"]] == ["t1", "t4"]
    # both answers' tokens: each pool reported its own prompt and three completion tokens
    assert record["completion_tokens"] == 3 + 3
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    explained = record["explanation"]["cascade"]
    assert explained["first_tier"] == "t1" and explained["escalated_to"] == "t4"
    assert record["explanation"]["answering_tier"] == "t4"


async def test_a_confident_answer_is_kept(stack: LocalStack) -> None:
    stack.pool("t1").pool.script.confidence = 0.8
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=COLOUR, logprobs=True
        )
    completion = raw.parse()
    assert raw.headers["x-foveal-tier"] == "t1"
    assert not stack.pool("t4").pool.requests
    lp = completion.choices[0].logprobs  # asked for: passed through
    assert lp is not None and lp.content is not None and len(lp.content) == 3
    assert lp.content[0].logprob == pytest.approx(math.log(0.8))
    record = await _record(stack, raw.headers["x-foveal-request-id"])
    assert record["cost"] == 1.0
    assert record["features"]["cascade"]["escalated_to"] is None


async def test_max_escalations_bounds_the_climb() -> None:
    policy = {"cascade": {"threshold": 0.5, "max_escalations": 2}}
    async with running_stack(tenant_policy=policy) as stack:
        for tier in ("t1", "t4", "t16"):
            stack.pool(tier).pool.script.confidence = 0.2
        async with _client(stack) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=COLOUR
            )
        assert raw.headers["x-foveal-tier"] == "t16"  # t1 -> t4 -> t16, then it stops
        assert not stack.pool("t64").pool.requests
        record = await _record(stack, raw.headers["x-foveal-request-id"])
        assert record["cost"] == 1.0 + 4.0 + 16.0
        assert [s["tier"] for s in record["features"]["cascade"]["steps"]] == ["t1", "t4", "t16"]


async def test_a_down_next_tier_is_skipped_upward(stack: LocalStack) -> None:
    stack.pool("t1").pool.script.confidence = 0.1
    stack.pool("t4").server.stop()
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=COLOUR)
    assert raw.headers["x-foveal-tier"] == "t16"
    record = await _record(stack, raw.headers["x-foveal-request-id"])
    assert record["cost"] == 1.0 + 16.0


async def test_the_first_answer_is_kept_when_no_higher_tier_can_answer() -> None:
    policy = {"cascade": {"threshold": 0.5}, "allowed_tiers": ["t1", "t4"]}
    async with running_stack(tenant_policy=policy) as stack:
        stack.pool("t1").pool.script.answer = "the only answer"
        stack.pool("t1").pool.script.confidence = 0.1
        stack.pool("t4").pool.script.fail_status = 503
        async with _client(stack) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=COLOUR
            )
        assert raw.headers["x-foveal-tier"] == "t1"
        assert raw.parse().choices[0].message.content == "the only answer"
        assert stack.pool("t4").pool.requests  # it was asked, and failed
        assert not stack.pool("t16").pool.requests  # never outside the allowed tiers
        record = await _record(stack, raw.headers["x-foveal-request-id"])
        assert record["outcome"] == "ok" and record["cost"] == 1.0
        cascade = record["features"]["cascade"]
        assert cascade["escalated_to"] is None and "NoEligiblePool" in cascade["error"]
        assert record["explanation"]["cascade"]["error"] == cascade["error"]


async def test_streams_and_pins_do_not_cascade(stack: LocalStack) -> None:
    stack.pool("t1").pool.script.confidence = 0.1
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=COLOUR, stream=True
        )
        chunks = [c async for c in raw.parse()]
        pinned = await client.chat.completions.with_raw_response.create(model="t1", messages=COLOUR)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "answer from t1" and raw.headers["x-foveal-tier"] == "t1"
    assert pinned.headers["x-foveal-tier"] == "t1"
    assert not stack.pool("t4").pool.requests
    assert all("logprobs" not in body for body in stack.pool("t1").pool.requests)
    await stack.core.writer.flush()
    streamed = await _record(stack, raw.headers["x-foveal-request-id"])
    assert streamed["features"]["cascade"] == {"threshold": 0.5, "skipped": "stream"}
    assert streamed["explanation"]["cascade"]["skipped"] == "stream"
    record = await _record(stack, pinned.headers["x-foveal-request-id"])
    assert record["features"]["cascade"]["skipped"] == "pinned"


async def test_without_a_cascade_policy_nothing_changes() -> None:
    async with running_stack() as stack:
        stack.pool("t1").pool.script.confidence = 0.01
        async with _client(stack) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=COLOUR
            )
        assert raw.headers["x-foveal-tier"] == "t1"
        assert "logprobs" not in stack.pool("t1").pool.requests[0]
        record = await _record(stack, raw.headers["x-foveal-request-id"])
        assert "cascade" not in record["features"]
        assert record["explanation"]["cascade"] is None
