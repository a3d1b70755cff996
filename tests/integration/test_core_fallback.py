"""Fallback under the quality floor: when the chosen tier is down or saturated (429), the
request moves only to tiers predicted to meet the tenant's floor, else it is refused at once
with a 503 that names the tiers and the floor. Real gateway, real fake pools on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest

from foveal.config import PolicySettings
from foveal.router.policies import Decision, DecisionContext, Reward, register_policy
from foveal.router.tenant_policy import TenantPolicies
from foveal.testing.images import image_message
from foveal.testing.stack import LocalStack, running_stack

P = {"t1": 0.3, "t4": 0.5, "t16": 0.7, "t64": 0.85, "t256": 0.9}
MSG = [image_message("what is in the picture?")]


@register_policy("test-fallback-predicting")
class _Predicting:
    """Picks ``tier`` and predicts ``predicted``, like the learned policies (test script)."""

    name = "test-fallback-predicting"

    def __init__(self, settings: PolicySettings) -> None:
        self.tier = "t16"
        self.predicted: dict[str, float] = dict(P)

    def select(self, ctx: DecisionContext) -> Decision:
        return Decision(
            tier=self.tier,
            policy=self.name,
            reason="scripted",
            predicted=dict(self.predicted),
        )

    def update(self, reward: Reward) -> None:
        """Learns nothing."""


def _policy(stack: LocalStack) -> _Predicting:
    policy = stack.core.policy
    assert isinstance(policy, _Predicting)
    return policy


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    async with running_stack(
        policy={"name": "test-fallback-predicting"}, tenant_policy={"quality_floor": 0.6}
    ) as s:
        yield s


def _client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


async def _ask(stack: LocalStack) -> tuple[str, str]:
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    return raw.headers["x-foveal-tier"], raw.headers["x-foveal-request-id"]


async def _refused(stack: LocalStack) -> dict[str, Any]:
    async with _client(stack) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="auto", messages=MSG)
    assert err.value.status_code == 503
    assert int(err.value.response.headers["retry-after"]) >= 1
    error: dict[str, Any] = err.value.response.json()["error"]
    return error


async def _record(stack: LocalStack, rid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.http_url}/v1/decisions/{rid}") as r:
        record: dict[str, Any] = await r.json()
        return record


def _requests(stack: LocalStack, tier: str) -> int:
    return len(stack.pool(tier).pool.requests)


async def test_a_down_tier_falls_back_only_to_tiers_meeting_the_floor(stack: LocalStack) -> None:
    assert (await _ask(stack))[0] == "t16"
    stack.pool("t16").server.stop()
    tier, rid = await _ask(stack)
    assert tier == "t64"  # the nearest higher tier, predicted 0.85 >= 0.6
    record = await _record(stack, rid)
    assert record["chosen_tier"] == "t16" and record["tier"] == "t64"
    excluded = record["explanation"]["fallback_excluded"]
    assert set(excluded) == {"t4", "t1"}
    assert excluded["t4"] == "predicted P(correct) 0.5 is below the quality floor 0.6"


async def test_no_tier_meeting_the_floor_is_a_clear_503(stack: LocalStack) -> None:
    for tier in ("t16", "t64", "t256"):
        stack.pool(tier).server.stop()
    error = await _refused(stack)
    assert error["code"] == "no_tier_meets_floor"
    message = error["message"]
    assert "Tiers tried: t16, t64, t256" in message
    assert "t4: predicted P(correct) 0.5 is below the quality floor 0.6" in message
    assert "t1: predicted P(correct) 0.3 is below the quality floor 0.6" in message
    assert _requests(stack, "t4") == 0 and _requests(stack, "t1") == 0


async def test_a_saturated_tier_moves_on_while_the_floor_holds(stack: LocalStack) -> None:
    stack.pool("t16").pool.script.fail_status = 429  # its queue is full
    assert (await _ask(stack))[0] == "t64"
    assert _requests(stack, "t16") == 1  # it was asked; a 429 does not open its breaker
    assert (await _ask(stack))[0] == "t64"
    assert _requests(stack, "t16") == 2
    # nothing above the chosen tier meets a stricter floor: refused, lower tiers untouched
    _policy(stack).predicted = {**P, "t16": 0.95, "t64": 0.9, "t256": 0.9}
    stack.core.tenant_policies.replace(_with_floor(stack, 0.93))
    error = await _refused(stack)
    assert "HTTP 429" in error["message"] and "quality floor 0.93" in error["message"]
    assert _requests(stack, "t64") == 2 and _requests(stack, "t4") == 0


async def test_a_tier_without_a_prediction_is_not_a_fallback(stack: LocalStack) -> None:
    _policy(stack).predicted = {"t16": 0.7, "t4": 0.9}  # the policy knows nothing of t64+
    stack.pool("t16").server.stop()
    tier, rid = await _ask(stack)
    assert tier == "t4"  # below the chosen tier, but predicted to meet the floor
    excluded = (await _record(stack, rid))["features"]["fallback_excluded"]
    assert "no predicted P(correct)" in excluded["t64"] and "t1" in excluded


async def test_without_predictions_or_floor_fallback_is_unchanged() -> None:
    async with running_stack(policy={"name": "test-fallback-predicting"}) as stack:
        _policy(stack).predicted = {}
        for tier in ("t16", "t64", "t256"):
            stack.pool(tier).server.stop()
        tier, rid = await _ask(stack)
        assert tier == "t4"  # no floor to hold: the nearest lower tier answers
        assert "fallback_excluded" not in (await _record(stack, rid))["features"]
        for tier in ("t4", "t1"):
            stack.pool(tier).server.stop()
        error = await _refused(stack)
        assert error["code"] is None and "no pool endpoint could serve" in error["message"]


def _with_floor(stack: LocalStack, floor: float) -> TenantPolicies:
    default = stack.core.tenant_policies.snapshot.default
    return TenantPolicies(default=replace(default, quality_floor=floor))
