"""The OpenAI-compatible HTTP edge (FastAPI): parses once, calls the core, renders the answer."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from foveal import __version__, metrics
from foveal.errors import FovealError, InvalidRequest, PayloadTooLarge, http_error_body
from foveal.router.core import RouterCore
from foveal.router.explain import explain_record
from foveal.router.openai_wire import (
    load_json_object,
    parse_body,
    render_chunk,
    render_result,
    to_raw_messages,
)
from foveal.router.results import ChatDelta
from foveal.store.records import DecisionRecord

__all__ = ["create_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _error_response(err: FovealError) -> JSONResponse:
    return JSONResponse(http_error_body(err), status_code=err.http_status, headers=err.headers())


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.headers.get("x-api-key")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is over the {limit}-byte limit", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body is over the {limit}-byte limit", code="body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (and so the pool call) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        log.info("client disconnected; request cancelled")
    return await task


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _record_json(record: DecisionRecord) -> dict[str, Any]:
    """The stored record as recorded, plus its ``explanation`` (explicit fields, null if absent)."""
    data = asdict(record)
    if record.created_at is not None:
        data["created_at"] = record.created_at.isoformat()
    data["explanation"] = explain_record(record).to_json()
    return data


def create_app(core: RouterCore) -> FastAPI:
    app = FastAPI(
        title="Foveal gateway",
        version=__version__,
        description="OpenAI-compatible gateway of the Foveal visual-token router.",
    )
    limits = core.settings.limits

    @app.exception_handler(FovealError)
    async def _foveal_error(_: Request, exc: FovealError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = {
            "error": {
                "message": "internal error",
                "type": "internal_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        tenant = await core.authenticate(_bearer(request))
        body = parse_body(await _read_body(request, limits.max_body_bytes))
        req = await core.build_request(
            tenant=tenant,
            model=body.model,
            messages=to_raw_messages(body),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            stream=body.stream,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs,
            seed=body.seed,
            session_id=request.headers.get("x-foveal-session-id"),
            edge="http",
        )
        if not body.stream:
            result = await _until_disconnect(request, core.chat(req))
            headers = _foveal_headers(result.request_id, result.tier, result.feedback_token)
            return JSONResponse(render_result(result), headers=headers)
        stream = await core.chat_stream(req)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        headers = _foveal_headers(stream.request_id, stream.tier, stream.feedback_token)
        return StreamingResponse(
            _sse(stream, include_usage), media_type="text/event-stream", headers=headers
        )

    async def _sse(stream: Any, include_usage: bool) -> AsyncIterator[bytes]:
        rid, model, created = stream.request_id, stream.model, stream.created
        try:
            yield render_chunk(rid, model, created, None, role="assistant")
            last: ChatDelta | None = None
            async for delta in stream:
                if delta.usage is not None:
                    last = delta
                if delta.content or delta.finish_reason:
                    yield render_chunk(rid, model, created, delta)
            if include_usage and last is not None:
                yield render_chunk(rid, model, created, last, usage_only=True)
            yield b"data: [DONE]\n\n"
        except FovealError as exc:
            yield b"data: " + json.dumps(http_error_body(exc)).encode() + b"\n\n"
        finally:
            await stream.aclose()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        catalog = core.catalog.snapshot
        data = [
            {
                "id": "auto",
                "object": "model",
                "created": 0,
                "owned_by": "foveal",
                "description": "Foveal picks the tier per request.",
            }
        ]
        for tier in catalog.tiers:
            data.append(
                {
                    "id": tier.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "foveal",
                    "visual_tokens": tier.visual_tokens,
                    "cost_weight": tier.cost_weight,
                    "available_endpoints": core.pools.available(tier.name),
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        tenant = await core.authenticate(_bearer(request))
        data = load_json_object(await _read_body(request, 64 * 1024))
        request_id, token, score = data.get("request_id"), data.get("token"), data.get("score")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("`request_id` (string) is required", param="request_id")
        if not isinstance(token, str) or not token:
            raise InvalidRequest("`token` (string) is required", param="token")
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise InvalidRequest("`score` (number 0..1) is required", param="score")
        await core.feedback(tenant=tenant, request_id=request_id, token=token, score=float(score))
        return {"accepted": True, "request_id": request_id}

    @app.get("/v1/decisions/{request_id}")
    async def decision(request_id: str, request: Request) -> dict[str, Any]:
        tenant = await core.authenticate(_bearer(request))
        return _record_json(await core.explain(tenant=tenant, request_id=request_id))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        tiers = {t: core.pools.available(t) for t in core.catalog.snapshot.names}
        ready = any(n > 0 for n in tiers.values())
        return JSONResponse(
            {"ready": ready, "available_endpoints": tiers}, status_code=200 if ready else 503
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE_LATEST)

    return app


def _foveal_headers(request_id: str, tier: str, token: str) -> dict[str, str]:
    return {
        "x-foveal-request-id": request_id,
        "x-foveal-tier": tier,
        "x-foveal-feedback-token": token,
    }
