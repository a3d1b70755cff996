"""The gRPC edge: ``foveal.v1.Router`` over the router core, plus health and reflection.

Each RPC reads the API key from metadata, converts the proto request to the core's arguments
once, calls the core, and renders the core's answer as protos. Errors the core raises on
purpose (``FovealError``) become their gRPC status; anything else is logged and reported as
INTERNAL without details.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from foveal.api.v1 import router_pb2 as pb
from foveal.api.v1 import router_pb2_grpc as pb_grpc
from foveal.errors import FovealError, InvalidRequest
from foveal.router.core import RouterCore
from foveal.router.explain import CascadeExplanation, Explanation, explain_record
from foveal.router.requests import RawImage
from foveal.router.results import ChatDelta, ChatResult, ChatStream, Usage
from foveal.store.records import DecisionRecord

__all__ = [
    "SERVICE_NAME",
    "RouterService",
    "api_key_from_metadata",
    "chat_chunk",
    "chat_request_args",
    "chat_response",
    "decision_record",
    "explanation",
    "start_grpc_server",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name  # "foveal.v1.Router"

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Metadata = Sequence[tuple[str, str | bytes]]
_Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_Info: TypeAlias = dict[str, Any]  # request_id, tenant, tier: the extras of request-path log lines


# ---- wire -> core ------------------------------------------------------------------------


def api_key_from_metadata(metadata: _Metadata | None) -> str | None:
    """The key of ``authorization: Bearer KEY``, else of ``x-api-key: KEY``, else None."""
    bearer = plain = None
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        name = key.lower()
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == "x-api-key" and value.strip():
            plain = value.strip()
    return bearer or plain


def _from_float32(value: float) -> float:
    """The shortest decimal the float32 ``value`` stands for (0.7f -> 0.7, not 0.69999998)."""
    if not math.isfinite(value):
        return value
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.unpack("f", struct.pack("f", candidate))[0] == value:
                return candidate
        except OverflowError:
            break
    return value


def _raw_image(image: pb.Image, param: str) -> RawImage:
    source = image.WhichOneof("source")
    if source == "data":
        return RawImage(data=image.data, mime=image.mime_type or None)
    if source == "url":
        return RawImage(url=image.url)
    raise InvalidRequest("an image needs `data` or `url`", param=param)


def chat_request_args(request: pb.ChatRequest, *, tenant: str, stream: bool) -> dict[str, Any]:
    """The keyword arguments of ``core.build_request`` for one proto ``ChatRequest``."""
    messages: list[tuple[str, list[str | RawImage]]] = []
    for i, message in enumerate(request.messages):
        parts: list[str | RawImage] = []
        for j, part in enumerate(message.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(part.text)
            elif kind == "image":
                parts.append(_raw_image(part.image, f"messages[{i}].content[{j}].image"))
            else:
                raise InvalidRequest(
                    "a content part needs `text` or `image`", param=f"messages[{i}].content[{j}]"
                )
        messages.append((message.role, parts))

    def opt(name: str) -> Any:
        return getattr(request, name) if request.HasField(name) else None

    temperature, top_p = opt("temperature"), opt("top_p")
    return {
        "tenant": tenant,
        "model": request.model or "auto",
        "messages": messages,
        "max_tokens": opt("max_tokens"),
        "stream": stream,
        "temperature": None if temperature is None else _from_float32(temperature),
        "top_p": None if top_p is None else _from_float32(top_p),
        "stop": tuple(request.stop),
        "logprobs": request.logprobs,
        "top_logprobs": opt("top_logprobs"),
        "seed": opt("seed"),
        "session_id": request.session_id or None,
        "edge": "grpc",
    }


# ---- core -> wire ------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` as something a ``google.protobuf.Struct`` holds (unknown types as text)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(_jsonable(value))
    return out


def _usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


_Answer = TypeVar("_Answer", pb.ChatResponse, pb.ChatChunk)


def _with_extras(out: _Answer, usage: Usage | None, logprobs: Mapping[str, Any] | None) -> _Answer:
    """Set the optional `usage` and `logprobs` fields shared by responses and chunks."""
    if usage is not None:
        out.usage.CopyFrom(_usage(usage))
    if logprobs is not None:
        out.logprobs.CopyFrom(_struct(logprobs))
    return out


def chat_response(result: ChatResult) -> pb.ChatResponse:
    out = pb.ChatResponse(
        request_id=result.request_id,
        tier=result.tier,
        feedback_token=result.feedback_token,
        model=result.model,
        created=result.created,
        content=result.content,
        finish_reason=result.finish_reason or "",
    )
    return _with_extras(out, result.usage, result.logprobs)


def chat_chunk(stream: ChatStream, delta: ChatDelta) -> pb.ChatChunk:
    out = pb.ChatChunk(
        request_id=stream.request_id,
        tier=stream.tier,
        feedback_token=stream.feedback_token,
        model=stream.model,
        created=stream.created,
        delta=delta.content,
        finish_reason=delta.finish_reason or "",
    )
    return _with_extras(out, delta.usage, delta.logprobs)


def decision_record(record: DecisionRecord) -> pb.DecisionRecord:
    out = pb.DecisionRecord(
        request_id=record.request_id,
        tenant=record.tenant,
        tier=record.tier,
        chosen_tier=record.chosen_tier,
        requested_model=record.requested_model,
        policy=record.policy,
        reason=record.reason,
        propensity=record.propensity,
        features=_struct(record.features),
        predicted={str(k): float(v) for k, v in record.predicted.items()},
        outcome=record.outcome,
        error=record.error or "",
        latency_ms=record.latency_ms,
        pool_latency_ms=record.pool_latency_ms,
        cost=record.cost,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        edge=record.edge,
        explanation=explanation(explain_record(record)),
    )
    if record.created_at is not None:
        created = record.created_at
        if created.tzinfo is None:  # the store keeps UTC; SQLite drops the zone
            created = created.replace(tzinfo=UTC)
        out.created_at.FromDatetime(created)
    return out


def explanation(e: Explanation) -> pb.Explanation:
    """The proto form of an explanation: unset fields where the record holds nothing."""
    out = pb.Explanation(
        policy=e.policy,
        chosen_by=e.chosen_by,
        chosen_tier=e.chosen_tier,
        answering_tier=e.answering_tier,
        propensity=e.propensity,
        quality_weight=e.quality_weight,
        quality_floor=e.quality_floor,
        predicted=e.predicted or {},
        cheapest_meeting_floor=e.cheapest_meeting_floor,
        fallback_excluded=e.fallback_excluded or {},
    )
    if e.features_summary is not None:
        out.features_summary.CopyFrom(_struct(e.features_summary))
    if e.session is not None:
        s = e.session
        out.session.CopyFrom(
            pb.SessionExplanation(
                key=s.key,
                previous_tier=s.previous_tier,
                floor_tier=s.floor_tier,
                floor_applied=s.floor_applied,
            )
        )
    if e.cascade is not None:
        out.cascade.CopyFrom(_cascade(e.cascade))
    return out


def _cascade(c: CascadeExplanation) -> pb.CascadeExplanation:
    return pb.CascadeExplanation(
        threshold=c.threshold,
        first_tier=c.first_tier,
        confidence=c.confidence,
        escalated_to=c.escalated_to,
        skipped=c.skipped,
        error=c.error,
    )


def _answer_metadata(answer: ChatResult | ChatStream) -> tuple[tuple[str, str], ...]:
    return (
        ("x-foveal-request-id", answer.request_id),
        ("x-foveal-tier", answer.tier),
        ("x-foveal-feedback-token", answer.feedback_token),
    )


# ---- the service ---------------------------------------------------------------------------


async def _abort(context: _Ctx, method: str, exc: Exception, info: _Info) -> NoReturn:
    """End the call with the status for ``exc``: its own for a FovealError, else INTERNAL."""
    if isinstance(exc, grpc.aio.AbortError):  # the call is already ending
        raise exc
    if isinstance(exc, FovealError):
        if exc.http_status >= 500:
            log.warning("%s failed: %s", method, exc.message, extra=info)
        trailing = tuple((k.lower(), v) for k, v in exc.headers().items())
        await context.abort(exc.grpc_code, exc.message, trailing_metadata=trailing)
    log.error("%s failed", method, exc_info=exc, extra=info)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable: context.abort raises")


class RouterService(pb_grpc.RouterServicer):
    """``foveal.v1.Router``: the gRPC edge of one :class:`RouterCore`."""

    def __init__(self, core: RouterCore) -> None:
        self._core = core

    async def _tenant(self, context: _Ctx, info: _Info) -> str:
        tenant = await self._core.authenticate(api_key_from_metadata(context.invocation_metadata()))
        info["tenant"] = tenant
        return tenant

    async def _unary(
        self,
        method: str,
        handler: Callable[[_Req, _Ctx, _Info], Awaitable[_Resp]],
        request: _Req,
        context: _Ctx,
    ) -> _Resp:
        info: _Info = {"request_id": None, "tenant": None, "tier": None}
        try:
            return await handler(request, context, info)
        except Exception as exc:
            await _abort(context, method, exc, info)

    async def Chat(self, request: pb.ChatRequest, context: _Ctx) -> pb.ChatResponse:
        return await self._unary("Chat", self._chat, request, context)

    async def _chat(self, request: pb.ChatRequest, context: _Ctx, info: _Info) -> pb.ChatResponse:
        tenant = await self._tenant(context, info)
        req = await self._core.build_request(
            **chat_request_args(request, tenant=tenant, stream=False)
        )
        info["request_id"] = req.request_id
        result = await self._core.chat(req)
        info["tier"] = result.tier
        await context.send_initial_metadata(_answer_metadata(result))
        return chat_response(result)

    async def ChatStream(self, request: pb.ChatRequest, context: _Ctx) -> None:
        # Written with context.write rather than as a generator so that a client's cancel
        # (grpc.aio cancels this task) lands inside the try below and closes the pool stream.
        info: _Info = {"request_id": None, "tenant": None, "tier": None}
        stream: ChatStream | None = None
        try:
            tenant = await self._tenant(context, info)
            req = await self._core.build_request(
                **chat_request_args(request, tenant=tenant, stream=True)
            )
            info["request_id"] = req.request_id
            stream = await self._core.chat_stream(req)
            info["tier"] = stream.tier
            await context.send_initial_metadata(_answer_metadata(stream))
            async for delta in stream:
                await context.write(chat_chunk(stream, delta))
        except Exception as exc:
            await _abort(context, "ChatStream", exc, info)
        finally:
            if stream is not None:
                try:
                    await stream.aclose()
                except Exception:
                    log.exception("closing the stream of %s failed", info["request_id"], extra=info)

    async def Feedback(self, request: pb.FeedbackRequest, context: _Ctx) -> pb.FeedbackResponse:
        return await self._unary("Feedback", self._feedback, request, context)

    async def _feedback(
        self,
        request: pb.FeedbackRequest,
        context: _Ctx,
        info: _Info,
    ) -> pb.FeedbackResponse:
        info["request_id"] = request.request_id
        tenant = await self._tenant(context, info)
        await self._core.feedback(
            tenant=tenant, request_id=request.request_id, token=request.token, score=request.score
        )
        return pb.FeedbackResponse(accepted=True)

    async def Explain(self, request: pb.ExplainRequest, context: _Ctx) -> pb.DecisionRecord:
        return await self._unary("Explain", self._explain, request, context)

    async def _explain(
        self,
        request: pb.ExplainRequest,
        context: _Ctx,
        info: _Info,
    ) -> pb.DecisionRecord:
        info["request_id"] = request.request_id
        tenant = await self._tenant(context, info)
        record = await self._core.explain(tenant=tenant, request_id=request.request_id)
        return decision_record(record)


async def start_grpc_server(
    core: RouterCore, host: str, port: int, *, max_message_bytes: int | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the Router, health and reflection services on ``host:port`` (0: a free port).

    ``max_message_bytes`` caps one request (default: the core's ``limits.max_body_bytes``);
    larger ones fail with RESOURCE_EXHAUSTED before they reach the core.
    """
    limit = max_message_bytes or core.settings.limits.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a shared one
        ]
    )
    pb_grpc.add_RouterServicer_to_server(RouterService(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"gRPC server could not bind {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.debug("gRPC router listening on %s", address.rsplit(":", 1)[0] + f":{bound}")
    return server, bound
