"""Sessions: the bounded map of each session's last answering tier, and the session floor the
core enforces through the real gateway (fake pools, real HTTP)."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import openai
import pytest

from foveal.api.v1 import router_pb2 as pb
from foveal.api.v1 import router_pb2_grpc as pb_grpc
from foveal.config import PolicySettings
from foveal.router.policies import Decision, DecisionContext, Reward, register_policy
from foveal.router.sessions import SessionTiers, session_key
from foveal.testing.images import image_message
from foveal.testing.stack import LocalStack, running_stack

READ = [image_message("Read the sign")]  # the rule policy sends reading prompts to t256
HI = [{"role": "user", "content": "hi"}]  # no image: the rule policy's lowest tier, t1


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the map ----------------------------------------------------------------------------------


def test_remembers_the_last_answering_tier_per_tenant_and_session() -> None:
    s = SessionTiers(10, 60.0)
    assert s.get("acme", "chat-1") is None
    s.put("acme", "chat-1", "t16")
    s.put("acme", "chat-1", "t64")
    s.put("other", "chat-1", "t1")
    assert s.get("acme", "chat-1") == "t64"
    assert s.get("other", "chat-1") == "t1"  # the same id in another tenant is another session
    assert len(s) == 2


def test_least_recently_answered_sessions_are_evicted_first() -> None:
    s = SessionTiers(2, 60.0)
    s.put("t", "a", "t1")
    s.put("t", "b", "t4")
    s.put("t", "a", "t16")  # a is now the most recent
    s.put("t", "c", "t64")  # evicts b
    assert (s.get("t", "a"), s.get("t", "b"), s.get("t", "c")) == ("t16", None, "t64")
    assert len(s) == 2


def test_sessions_expire_after_the_ttl() -> None:
    clock = _Clock()
    s = SessionTiers(10, 30.0, clock=clock)
    s.put("t", "old", "t64")
    clock.now += 20
    s.put("t", "new", "t4")
    assert s.get("t", "old") == "t64"
    clock.now += 15  # old: 35 s since its last answer; new: 15 s
    assert s.get("t", "old") is None
    assert s.get("t", "new") == "t4"
    clock.now += 100
    s.put("t", "newest", "t1")  # a put sweeps expired entries from the cold end
    assert len(s) == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        SessionTiers(0, 1.0)
    with pytest.raises(ValueError, match="ttl_s"):
        SessionTiers(1, 0.0)


def test_session_key_is_stable_short_and_tenant_bound() -> None:
    assert session_key("acme", "s") == session_key("acme", "s")
    assert session_key("acme", "s") != session_key("other", "s")
    assert len(session_key("acme", "x" * 200)) == 16


# -- through the gateway ------------------------------------------------------------------------


def _client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


async def _turn(
    stack: LocalStack, messages: list[dict[str, Any]], session: str | None, model: str = "auto"
) -> tuple[str, str]:
    """One turn; (answering tier, request id)."""
    headers = {"x-foveal-session-id": session} if session else {}
    async with _client(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, extra_headers=headers
        )
    return raw.headers["x-foveal-tier"], raw.headers["x-foveal-request-id"]


async def _record(stack: LocalStack, rid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.http_url}/v1/decisions/{rid}") as r:
        assert r.status == 200
        record: dict[str, Any] = await r.json()
        return record


async def test_a_session_never_goes_below_its_previous_tier(stack: LocalStack) -> None:
    tier, first = await _turn(stack, READ, "chat-1")
    assert tier == "t256"
    tier, rid = await _turn(stack, HI, "chat-1")
    assert tier == "t256"  # the rule policy picked t1; the session floor raised it
    record = await _record(stack, rid)
    assert record["chosen_tier"] == "t256"
    assert record["reason"] == "no image; session floor: previous turn answered at t256"
    session = record["features"]["session"]
    assert session["previous_tier"] == "t256" and session["floor_applied"] is True
    assert session["key"] == session_key("default", "chat-1")
    assert record["features"]["policy_tier"] == "t1"  # what the policy drew
    assert (await _record(stack, first))["features"]["session"]["previous_tier"] is None
    # another session and a request without one are routed on their own
    assert (await _turn(stack, HI, "chat-2"))[0] == "t1"
    tier, rid = await _turn(stack, HI, None)
    assert tier == "t1" and "session" not in (await _record(stack, rid))["features"]


async def test_a_pinned_turn_is_not_raised_and_sets_the_next_floor(stack: LocalStack) -> None:
    await _turn(stack, READ, "chat-1")  # t256
    tier, rid = await _turn(stack, HI, "chat-1", model="t4")
    assert tier == "t4"  # the client asked for t4: not silent, so allowed
    assert (await _record(stack, rid))["features"]["session"]["floor_applied"] is False
    tier, rid = await _turn(stack, HI, "chat-1")
    assert tier == "t4"  # the floor is the tier that answered the previous turn
    assert "previous turn answered at t4" in (await _record(stack, rid))["reason"]


async def test_the_tenant_policy_may_allow_downgrades() -> None:
    async with running_stack(tenant_policy={"allow_session_downgrade": True}) as stack:
        await _turn(stack, READ, "chat-1")
        tier, rid = await _turn(stack, HI, "chat-1")
        assert tier == "t1"
        session = (await _record(stack, rid))["features"]["session"]
        assert session["previous_tier"] == "t256" and session["floor_applied"] is False


async def test_fallback_never_leaves_a_session_below_its_floor(stack: LocalStack) -> None:
    msgs = [image_message("Read the sign")]
    await _turn(stack, msgs, "chat-1")  # t256
    stack.pool("t256").server.stop()
    async with _client(stack) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(
                model="auto", messages=HI, extra_headers={"x-foveal-session-id": "chat-1"}
            )
    assert err.value.status_code == 503
    assert int(err.value.response.headers["retry-after"]) >= 1
    body = err.value.response.json()["error"]
    assert body["code"] == "no_tier_meets_floor"
    assert "t64: below the session floor t256" in body["message"]
    assert not stack.pool("t64").pool.requests and not stack.pool("t1").pool.requests
    # a request outside the session still falls back as before
    assert (await _turn(stack, msgs, None))[0] == "t64"


async def test_a_too_long_session_id_is_refused(stack: LocalStack) -> None:
    async with _client(stack) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model="auto", messages=HI, extra_headers={"x-foveal-session-id": "s" * 257}
            )
    error = err.value.response.json()["error"]
    assert error["param"] == "session_id" and "257" in error["message"]
    assert not any(p.pool.requests for local in stack.pools.values() for p in local)


# -- what the policy sees ------------------------------------------------------------------------


@register_policy("test-sessions-recorder")
class _Recorder:
    """Routes to t4 (or the pin) and keeps the previous tier each decision context carried."""

    name = "test-sessions-recorder"

    def __init__(self, settings: PolicySettings) -> None:
        self.seen: list[str | None] = []

    def select(self, ctx: DecisionContext) -> Decision:
        self.seen.append(ctx.previous_tier)
        if ctx.request.pinned:
            return Decision(tier=ctx.request.model, policy=self.name, reason="pinned")
        return Decision(tier="t4", policy=self.name, reason="t4 unless pinned")

    def update(self, reward: Reward) -> None:
        """Learns nothing."""


async def test_the_policy_gets_the_previous_tier_over_grpc_too() -> None:
    async with running_stack(policy={"name": "test-sessions-recorder"}) as stack:
        policy = stack.core.policy
        assert isinstance(policy, _Recorder)
        await _turn(stack, HI, "chat-1", model="t16")  # pinned over HTTP, answered at t16
        msg = pb.Message(role="user", content=[pb.ContentPart(text="hi")])
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            stub = pb_grpc.RouterStub(channel)
            resp = await stub.Chat(pb.ChatRequest(messages=[msg], session_id="chat-1"))
            other = await stub.Chat(pb.ChatRequest(messages=[msg], session_id="chat-9"))
        assert policy.seen == [None, "t16", None]
        assert resp.tier == "t16"  # the policy said t4; the session floor kept t16
        assert other.tier == "t4"
