"""Explain: the decision record's explicit fields (predictions, λ, floor, chosen and answering
tier, propensity, cheapest tier meeting the floor, session, cascade) over real HTTP
(`GET /v1/decisions/{id}`) and real gRPC (`Explain`), for a predicting policy and for rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format

from foveal.api.v1 import router_pb2 as pb
from foveal.api.v1 import router_pb2_grpc as pb_grpc
from foveal.config import PolicySettings
from foveal.router.explain import explain_record
from foveal.router.grpc_service import decision_record
from foveal.router.policies import Decision, DecisionContext, Reward, register_policy
from foveal.store.records import DecisionRecord
from foveal.testing.images import image_message
from foveal.testing.stack import LocalStack, running_stack

P = {"t1": 0.2, "t4": 0.45, "t16": 0.72, "t64": 0.8, "t256": 0.81}
SUMMARY = {"images": 1, "min_side": 48, "ocr_cue": False}


@register_policy("test-explain-learned")
class _Learned:
    """Fills Decision like the learned policies do (the keys of the shared contract)."""

    name = "test-explain-learned"

    def __init__(self, settings: PolicySettings) -> None:
        pass

    def select(self, ctx: DecisionContext) -> Decision:
        if ctx.request.pinned:
            return Decision(tier=ctx.request.model, policy=self.name, reason="pinned")
        tp = ctx.tenant_policy
        assert tp is not None
        return Decision(
            tier="t16",
            policy=self.name,
            reason="cheapest tier meeting the floor",
            propensity=0.85,
            features={
                "context": [0.5, 1.0],
                "summary": SUMMARY,
                "quality_weight": tp.quality_weight,
                "quality_floor": tp.quality_floor,
                "cheapest_meeting_floor": "t16",
                "chosen_by": "model",
            },
            predicted=dict(P),
        )

    def update(self, reward: Reward) -> None:
        """Learns nothing."""


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    async with running_stack(
        policy={"name": "test-explain-learned"},
        tenant_policy={"quality_weight": 0.3, "quality_floor": 0.7},
    ) as s:
        yield s


async def _chat(stack: LocalStack, session: str | None = None, model: str = "auto") -> str:
    headers = {"x-foveal-session-id": session} if session else {}
    body = {"model": model, "messages": [image_message("what is this?")]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{stack.http_url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        return r.headers["x-foveal-request-id"]


async def _http_explain(stack: LocalStack, rid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.http_url}/v1/decisions/{rid}") as r:
        assert r.status == 200
        record: dict[str, Any] = await r.json()
        return record


async def _grpc_explain(stack: LocalStack, rid: str) -> pb.DecisionRecord:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.RouterStub(channel)
        record: pb.DecisionRecord = await stub.Explain(pb.ExplainRequest(request_id=rid))
        return record


async def test_a_predicting_policy_is_explained_field_by_field(stack: LocalStack) -> None:
    await _chat(stack, session="conv-1", model="t64")  # the session's first turn, pinned
    rid = await _chat(stack, session="conv-1")
    await stack.core.writer.flush()
    record = await _http_explain(stack, rid)
    e = record["explanation"]
    assert e == {
        "policy": "test-explain-learned",
        "chosen_by": "model",
        "chosen_tier": "t64",  # the policy said t16; the session floor raised it
        "answering_tier": "t64",
        "propensity": 0.85,
        "quality_weight": 0.3,
        "quality_floor": 0.7,
        "predicted": P,
        "cheapest_meeting_floor": "t16",
        "features_summary": SUMMARY,
        "session": {
            "key": record["features"]["session"]["key"],
            "previous_tier": "t64",
            "floor_tier": "t64",
            "floor_applied": True,
        },
        "cascade": None,
        "fallback_excluded": {  # nearest first; t256 (above) stays a fallback
            t: "below the session floor t64 (previous turn answered at t64)"
            for t in ("t16", "t4", "t1")
        },
    }
    # the same over gRPC, as typed fields
    out = await _grpc_explain(stack, rid)
    x = out.explanation
    assert (x.policy, x.chosen_by, x.chosen_tier, x.answering_tier) == (
        "test-explain-learned",
        "model",
        "t64",
        "t64",
    )
    assert x.propensity == pytest.approx(0.85)
    assert x.quality_weight == pytest.approx(0.3) and x.quality_floor == pytest.approx(0.7)
    assert dict(x.predicted) == pytest.approx(P)
    assert x.cheapest_meeting_floor == "t16"
    assert json_format.MessageToDict(x.features_summary) == SUMMARY
    assert x.session.previous_tier == "t64" and x.session.floor_applied
    assert x.session.key == e["session"]["key"]
    assert not x.HasField("cascade")
    assert dict(x.fallback_excluded) == e["fallback_excluded"]
    assert out.created_at.seconds > 0  # written to the store, read back from it


async def test_a_rule_decision_has_nulls_where_nothing_was_predicted() -> None:
    async with running_stack(tenant_policy={"quality_weight": 0.25}) as stack:
        rid = await _chat(stack)
        record = await _http_explain(stack, rid)
        e = record["explanation"]
        assert e["policy"] == "rules" and e["chosen_tier"] == e["answering_tier"] == "t1"
        assert e["propensity"] == 1.0
        for absent in ("chosen_by", "predicted", "cheapest_meeting_floor", "session", "cascade"):
            assert e[absent] is None, absent
        assert e["fallback_excluded"] is None
        # λ and the floor come from the tenant policy in force; the summary from the core
        assert e["quality_weight"] == 0.25 and e["quality_floor"] == 0.0
        assert e["features_summary"] == {
            "images": 1,
            "image_sizes": [[64, 48]],
            "prompt_chars": len("what is this?"),
            "turn": 0,
        }
        x = (await _grpc_explain(stack, rid)).explanation
        for absent in ("chosen_by", "cheapest_meeting_floor", "session", "cascade"):
            assert not x.HasField(absent), absent
        assert not x.predicted and not x.fallback_excluded
        assert x.HasField("quality_weight") and x.quality_weight == pytest.approx(0.25)
        assert json_format.MessageToDict(x.features_summary)["turn"] == 0


async def test_a_cascade_is_explained_over_grpc() -> None:
    async with running_stack(tenant_policy={"cascade": {"threshold": 0.6}}) as stack:
        stack.pool("t1").pool.script.confidence = 0.25
        rid = await _chat(stack)
        await stack.core.writer.flush()  # read back from the store
        c = (await _grpc_explain(stack, rid)).explanation.cascade
        assert (c.first_tier, c.escalated_to) == ("t1", "t4")
        assert c.confidence == pytest.approx(0.25) and c.threshold == pytest.approx(0.6)
        assert not c.HasField("skipped") and not c.HasField("error")


async def test_unknown_decisions_are_not_found_on_both_edges(stack: LocalStack) -> None:
    rid = await _chat(stack)
    async with aiohttp.ClientSession() as s, s.get(f"{stack.http_url}/v1/decisions/req_nope") as r:
        assert r.status == 404
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _grpc_explain(stack, "req_nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    e = (await _http_explain(stack, rid))["explanation"]
    assert e["chosen_tier"] == "t16" and e["session"] is None
    assert e["fallback_excluded"] == {  # t64 and t256 meet the floor 0.7; t4 and t1 do not
        "t4": "predicted P(correct) 0.45 is below the quality floor 0.7",
        "t1": "predicted P(correct) 0.2 is below the quality floor 0.7",
    }


def test_a_record_with_odd_features_explains_with_nulls() -> None:
    """Records written by older routers or other policies: wrong types read as absent."""
    record = DecisionRecord(
        request_id="req_1",
        tenant="acme",
        tier="t4",
        chosen_tier="t4",
        requested_model="auto",
        policy="old",
        reason="r",
        propensity=1.0,
        features={
            "quality_weight": "high",
            "quality_floor": float("nan"),
            "tenant_policy": "not a mapping",
            "summary": ["not", "a", "mapping"],
            "session": True,  # what routers before sessions recorded
            "cascade": {"threshold": 0.5, "confidence": True, "first_tier": ""},
            "chosen_by": 3,
            "images": 2,
        },
    )
    e = explain_record(record)
    assert e.quality_weight is None and e.quality_floor is None and e.chosen_by is None
    assert e.session is None and e.predicted is None
    assert e.features_summary == {"images": 2}
    assert e.cascade is not None and e.cascade.threshold == 0.5
    assert e.cascade.confidence is None and e.cascade.first_tier is None
    x = decision_record(record).explanation
    assert not x.HasField("quality_weight") and not x.HasField("session")
    assert x.cascade.threshold == 0.5 and not x.cascade.HasField("confidence")
