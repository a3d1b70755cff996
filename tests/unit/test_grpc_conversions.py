"""The gRPC edge's conversions: proto -> core arguments, core results -> protos."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import json_format

from foveal.api.v1 import router_pb2 as pb
from foveal.errors import InvalidRequest
from foveal.router.grpc_service import (
    SERVICE_NAME,
    api_key_from_metadata,
    chat_chunk,
    chat_request_args,
    chat_response,
    decision_record,
)
from foveal.router.requests import RawImage
from foveal.router.results import ChatDelta, ChatResult, Usage
from foveal.store.records import DecisionRecord


def test_service_name() -> None:
    assert SERVICE_NAME == "foveal.v1.Router"


def test_request_with_text_and_images() -> None:
    msg = pb.ChatRequest(
        model="t16",
        messages=[
            pb.Message(role="system", content=[pb.ContentPart(text="be brief")]),
            pb.Message(
                role="user",
                content=[
                    pb.ContentPart(text="what is this?"),
                    pb.ContentPart(image=pb.Image(data=b"\x89PNG...", mime_type="image/png")),
                    pb.ContentPart(image=pb.Image(data=b"\xff\xd8")),
                    pb.ContentPart(image=pb.Image(url="https://example.com/a.png")),
                ],
            ),
        ],
        max_tokens=32,
        temperature=0.7,
        top_p=0.9,
        stop=["\n\n", "END"],
        logprobs=True,
        top_logprobs=3,
        seed=-5,
        session_id="s-1",
    )
    args = chat_request_args(msg, tenant="acme", stream=True)
    assert args == {
        "tenant": "acme",
        "model": "t16",
        "messages": [
            ("system", ["be brief"]),
            (
                "user",
                [
                    "what is this?",
                    RawImage(data=b"\x89PNG...", mime="image/png"),
                    RawImage(data=b"\xff\xd8", mime=None),
                    RawImage(url="https://example.com/a.png"),
                ],
            ),
        ],
        "max_tokens": 32,
        "stream": True,
        "temperature": 0.7,  # not 0.699999988 (the float32 on the wire)
        "top_p": 0.9,
        "stop": ("\n\n", "END"),
        "logprobs": True,
        "top_logprobs": 3,
        "seed": -5,
        "session_id": "s-1",
        "edge": "grpc",
    }


def test_unset_fields_become_defaults() -> None:
    msg = pb.ChatRequest(messages=[pb.Message(role="user", content=[pb.ContentPart(text="")])])
    args = chat_request_args(msg, tenant="default", stream=False)
    assert args["model"] == "auto"
    assert args["messages"] == [("user", [""])]
    for key in ("max_tokens", "temperature", "top_p", "top_logprobs", "seed", "session_id"):
        assert args[key] is None, key
    assert args["stop"] == ()
    assert args["logprobs"] is False
    assert args["stream"] is False


def test_zero_values_that_were_set_are_kept() -> None:
    msg = pb.ChatRequest(max_tokens=0, temperature=0.0, seed=0, top_logprobs=0)
    args = chat_request_args(msg, tenant="t", stream=False)
    assert (args["max_tokens"], args["temperature"], args["seed"], args["top_logprobs"]) == (
        0,
        0.0,
        0,
        0,
    )


@pytest.mark.parametrize("value", [0.1, 0.7, 1.0, 1.3, 0.95, 2.0, 1e-3, 123456.7])
def test_float32_fields_come_back_as_the_decimal_sent(value: float) -> None:
    wire = pb.ChatRequest.FromString(pb.ChatRequest(temperature=value).SerializeToString())
    assert chat_request_args(wire, tenant="t", stream=False)["temperature"] == value


def test_empty_content_part_is_invalid() -> None:
    msg = pb.ChatRequest(
        messages=[pb.Message(role="user", content=[pb.ContentPart(text="hi"), pb.ContentPart()])]
    )
    with pytest.raises(InvalidRequest) as info:
        chat_request_args(msg, tenant="t", stream=False)
    assert info.value.param == "messages[0].content[1]"


def test_image_without_source_is_invalid() -> None:
    msg = pb.ChatRequest(
        messages=[
            pb.Message(role="user"),
            pb.Message(role="user", content=[pb.ContentPart(image=pb.Image(mime_type="x"))]),
        ]
    )
    with pytest.raises(InvalidRequest) as info:
        chat_request_args(msg, tenant="t", stream=False)
    assert info.value.param == "messages[1].content[0].image"


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        (None, None),
        ((), None),
        ((("authorization", "Bearer fvl_abc"),), "fvl_abc"),
        ((("authorization", "bearer   fvl_abc  "),), "fvl_abc"),
        ((("authorization", "Basic dXNlcg=="),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-api-key", "fvl_xyz"),), "fvl_xyz"),
        ((("x-api-key", "fvl_xyz"), ("authorization", "Bearer fvl_abc")), "fvl_abc"),
        ((("user-agent", "grpc-python"), ("x-api-key-bin", b"\x00")), None),
    ],
)
def test_api_key_from_metadata(metadata: object, key: str | None) -> None:
    assert api_key_from_metadata(metadata) == key  # type: ignore[arg-type]


def test_chat_response() -> None:
    result = ChatResult(
        request_id="req_1",
        tier="t4",
        feedback_token="tok.sig",
        model="t4",
        created=1_700_000_000,
        content="a cat",
        finish_reason="stop",
        usage=Usage(10, 2, 12),
        logprobs={"content": [{"token": "a", "logprob": -0.5, "top_logprobs": []}]},
    )
    out = chat_response(result)
    assert (out.request_id, out.tier, out.feedback_token, out.model) == (
        "req_1",
        "t4",
        "tok.sig",
        "t4",
    )
    assert (out.created, out.content, out.finish_reason) == (1_700_000_000, "a cat", "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        10,
        2,
        12,
    )
    assert json_format.MessageToDict(out.logprobs) == result.logprobs


def test_chat_response_without_usage_or_finish_reason() -> None:
    out = chat_response(
        ChatResult("req_1", "t1", "tok", "t1", 1, "", finish_reason=None, usage=None)
    )
    assert out.finish_reason == ""
    assert not out.HasField("usage")
    assert not out.HasField("logprobs")


class _Stream:
    request_id = "req_2"
    tier = "t64"
    feedback_token = "tok2"
    model = "t64"
    created = 42


def test_chat_chunks() -> None:
    first = chat_chunk(_Stream(), ChatDelta(content="Hel"))  # type: ignore[arg-type]
    assert (first.request_id, first.tier, first.feedback_token, first.model, first.created) == (
        "req_2",
        "t64",
        "tok2",
        "t64",
        42,
    )
    assert (first.delta, first.finish_reason, first.HasField("usage")) == ("Hel", "", False)
    last = chat_chunk(
        _Stream(),  # type: ignore[arg-type]
        ChatDelta(finish_reason="length", usage=Usage(5, 7, 12)),
    )
    assert (last.delta, last.finish_reason, last.usage.total_tokens) == ("", "length", 12)


def test_decision_record_full() -> None:
    record = DecisionRecord(
        request_id="req_3",
        tenant="acme",
        tier="t64",
        chosen_tier="t16",
        requested_model="auto",
        policy="rules",
        reason="document prompt",
        propensity=0.25,
        features={"images": 1, "image_sizes": [(640, 480)], "ocr": True, "x": None, "o": object},
        predicted={"t16": 0.4, "t64": 0.9},
        outcome="ok",
        error=None,
        latency_ms=12.5,
        pool_latency_ms=10.0,
        cost=64.0,
        prompt_tokens=100,
        completion_tokens=0,
        edge="grpc",
        created_at=datetime(2026, 1, 2, 3, 4, 5, 600_000),  # naive: UTC (as SQLite returns it)
    )
    out = decision_record(record)
    assert (out.request_id, out.tenant, out.tier, out.chosen_tier) == (
        "req_3",
        "acme",
        "t64",
        "t16",
    )
    assert (out.requested_model, out.policy, out.reason, out.propensity) == (
        "auto",
        "rules",
        "document prompt",
        0.25,
    )
    features = json_format.MessageToDict(out.features)
    assert features["images"] == 1
    assert features["image_sizes"] == [[640, 480]]
    assert features["ocr"] is True and features["x"] is None
    assert features["o"] == str(object)
    assert dict(out.predicted) == {"t16": 0.4, "t64": 0.9}
    assert (out.outcome, out.error, out.edge) == ("ok", "", "grpc")
    assert (out.latency_ms, out.pool_latency_ms, out.cost) == (12.5, 10.0, 64.0)
    assert out.HasField("completion_tokens") and out.completion_tokens == 0
    assert out.prompt_tokens == 100
    assert out.created_at.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, 600_000, UTC)


def test_decision_record_minimal() -> None:
    record = DecisionRecord(
        request_id="req_4",
        tenant="t",
        tier="t1",
        chosen_tier="t1",
        requested_model="t1",
        policy="pinned",
        reason="pinned",
        propensity=1.0,
        outcome="error",
        error="PoolError: boom",
        created_at=datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))),
    )
    out = decision_record(record)
    for name in ("latency_ms", "pool_latency_ms", "cost", "prompt_tokens", "completion_tokens"):
        assert not out.HasField(name), name
    assert out.error == "PoolError: boom"
    assert out.features == pb.DecisionRecord().features
    assert out.created_at.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 1, 10, tzinfo=UTC)


def test_decision_record_not_yet_stored_has_no_timestamp() -> None:
    record = DecisionRecord("r", "t", "t1", "t1", "auto", "rules", "x", 1.0)
    assert not decision_record(record).HasField("created_at")
