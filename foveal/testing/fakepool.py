"""A fake vLLM OpenAI-compatible server: the request schema, answers and errors of vLLM's
``/v1/chat/completions``, plus ``/v1/models``, ``/health`` and ``/metrics``.

Behaviour is scripted by a mutable :class:`FakeScript` that tests change between requests.
``python -m foveal.testing.fakepool --port N`` serves one with uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client import generate_latest as exposition
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from foveal.pools.chat_schema import ChatParams, Part, TextPart

__all__ = ["FakePool", "FakeScript"]

logger = logging.getLogger(__name__)

_encoder = json.JSONEncoder(separators=(",", ":"))
_dumps = _encoder.encode
_JSON = "application/json"


@dataclass
class FakeScript:
    """What the fake does; mutable at runtime."""

    answer: str | Callable[[dict[str, Any]], str] = "a fake answer"
    latency_s: float = 0.0  # before the response (or the first chunk)
    chunk_delay_s: float = 0.0  # between streamed chunks
    fail_status: int | None = None  # answer with this HTTP status (vLLM error JSON)
    fail_times: int | None = None  # how many requests fail (None: all while fail_status is set)
    confidence: float = 0.9  # mean token probability reported in logprobs
    healthy: bool = True  # /health answers 200, else 503


# -- vLLM's request schema (the parts Foveal uses) ------------------------------------------


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class _ChatRequest(ChatParams):
    messages: list[_Message] = Field(min_length=1)


# -- the server --------------------------------------------------------------------------


def _error(status: int, message: str, kind: str | None = None) -> Response:
    body: dict[str, Any] = {"object": "error", "message": message}
    body.update(type=kind or _error_type(status), param=None, code=status)
    return Response(_dumps(body), status_code=status, media_type=_JSON)


def _error_type(status: int) -> str:
    """vLLM's error type names: ``BadRequestError``, ``NotFoundError``, ``InternalServerError``."""
    try:
        name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "InternalServerError"
    return name if name.endswith("Error") else name + "Error"


class _BadRequest(Exception):
    pass


def _check_image(url: str) -> None:
    """A data URI that decodes and that Pillow opens; anything else is a bad request."""
    if not url.startswith("data:"):
        raise _BadRequest("Only data: image URLs are supported by this server.")
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise _BadRequest("Invalid image data URI: expected data:image/<type>;base64,<data>.")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
    except (binascii.Error, ValueError) as exc:
        raise _BadRequest(f"Invalid base64 image data: {exc}") from None
    except Exception as exc:  # Pillow raises many kinds
        raise _BadRequest(f"Failed to load image: {type(exc).__name__}: {exc}") from None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return f"{exc.error_count()} validation error(s): " + "; ".join(parts)


def _child(kind: type[Gauge] | type[Counter], name: str, doc: str, reg: Any, model: str) -> Any:
    return kind(name, doc, ["model_name"], registry=reg).labels(model)


class FakePool:
    """A fake vLLM server serving one model; ``app`` is its ASGI app."""

    def __init__(
        self,
        *,
        model: str = "foveal-ref",
        visual_tokens: int = 16,
        script: FakeScript | None = None,
        record: bool = True,
    ) -> None:
        self.model = model
        self.record = record  # keep every valid body in ``requests`` (off for long benchmarks)
        self.visual_tokens = visual_tokens
        self.script = script if script is not None else FakeScript()
        self.requests: list[dict[str, Any]] = []  # every valid body received
        self.cancelled = 0  # requests whose client went away before the answer finished
        self.created = int(time.time())
        reg = self.registry = CollectorRegistry()
        self._running = _child(Gauge, "vllm:num_requests_running", "Running.", reg, model)
        self._waiting = _child(Gauge, "vllm:num_requests_waiting", "Waiting.", reg, model)
        self._prompt_tokens = _child(Counter, "vllm:prompt_tokens", "Prefill.", reg, model)
        self._generation_tokens = _child(Counter, "vllm:generation_tokens", "Decode.", reg, model)
        success = Counter(
            "vllm:request_success", "Finished.", ["model_name", "finished_reason"], registry=reg
        )
        self._success = {r: success.labels(model, r) for r in ("stop", "length")}
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ]
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # -- small endpoints -------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200 if self.script.healthy else 503)

    async def _models(self, request: Request) -> Response:
        card = dict(id=self.model, object="model", created=self.created, owned_by="vllm")
        card.update(root=self.model, parent=None, max_model_len=4096, permission=[])
        return Response(_dumps({"object": "list", "data": [card]}), media_type=_JSON)

    async def _metrics(self, request: Request) -> Response:
        return Response(exposition(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- chat completions ------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"Invalid JSON body: {exc}")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        try:
            req = _ChatRequest.model_validate(body)
        except ValidationError as exc:
            return _error(400, _validation_message(exc))
        if req.model != self.model:
            return _error(404, f"The model `{req.model}` does not exist.", "NotFoundError")
        words = 0
        images = 0
        try:
            for msg in req.messages:
                if isinstance(msg.content, str):
                    words += len(msg.content.split())
                    continue
                for part in msg.content:
                    if isinstance(part, TextPart):
                        words += len(part.text.split())
                    else:
                        _check_image(part.image_url.url)
                        images += 1
        except _BadRequest as exc:
            return _error(400, str(exc))
        if self.record:
            self.requests.append(body)
        script = self.script
        fail = script.fail_status
        if fail is not None and script.fail_times is not None:
            if script.fail_times > 0:
                script.fail_times -= 1
            else:
                fail = None
        prompt_tokens = words + images * self.visual_tokens
        if req.stream and fail is None:
            gen = self._stream(req, body, prompt_tokens)
            return StreamingResponse(gen, media_type="text/event-stream")
        self._running.inc()
        try:
            if script.latency_s > 0 and await _client_left(request, script.latency_s):
                self.cancelled += 1
                return Response(status_code=499)
            if fail is not None:
                return _error(fail, f"Injected failure (HTTP {fail}).")
            return Response(_dumps(self._completion(req, body, prompt_tokens)), media_type=_JSON)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self._running.dec()

    def _answer(self, req: _ChatRequest, body: dict[str, Any]) -> tuple[list[str], str]:
        answer = self.script.answer
        text = answer(body) if callable(answer) else answer
        words = text.split()
        limit = req.max_tokens or req.max_completion_tokens
        finish = "stop"
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "length"
        self._generation_tokens.inc(len(words))
        self._success[finish].inc()
        return words, finish

    def _logprob(self, token: str, top: int) -> dict[str, Any]:
        conf = min(max(self.script.confidence, 1e-9), 1.0)
        lp = math.log(conf)
        entry: dict[str, Any] = {"token": token, "logprob": lp, "bytes": list(token.encode())}
        alts = [{"token": token, "logprob": lp, "bytes": entry["bytes"]}][:top]
        rest = math.log(max((1.0 - conf) / max(top - 1, 1), 1e-9))
        for alt in (f"<alt{i}>" for i in range(1, top)):
            alts.append({"token": alt, "logprob": rest, "bytes": list(alt.encode())})
        entry["top_logprobs"] = alts
        return entry

    def _completion(
        self, req: _ChatRequest, body: dict[str, Any], prompt_tokens: int
    ) -> dict[str, Any]:
        words, finish = self._answer(req, body)
        self._prompt_tokens.inc(prompt_tokens)
        logprobs = None
        if req.logprobs:
            top = req.top_logprobs or 0
            tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
            logprobs = {"content": [self._logprob(t, top) for t in tokens]}
        message = {"role": "assistant", "content": " ".join(words)}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": "chatcmpl-" + os.urandom(16).hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": _usage(prompt_tokens, len(words)),
        }

    async def _stream(
        self, req: _ChatRequest, body: dict[str, Any], prompt_tokens: int
    ) -> AsyncIterator[bytes]:
        script = self.script
        done = False
        self._running.inc()
        try:
            if script.latency_s > 0:
                await asyncio.sleep(script.latency_s)
            words, finish = self._answer(req, body)
            self._prompt_tokens.inc(prompt_tokens)
            cid = "chatcmpl-" + os.urandom(16).hex()
            head = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time())}
            head["model"] = self.model
            top = req.top_logprobs or 0

            def chunk(delta: dict[str, Any], lp: Any = None, fin: str | None = None) -> bytes:
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": fin}
                return b"data: " + _dumps({**head, "choices": [choice]}).encode() + b"\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for i, word in enumerate(words):
                if script.chunk_delay_s > 0:
                    await asyncio.sleep(script.chunk_delay_s)
                token = word if i == 0 else " " + word
                lp = {"content": [self._logprob(token, top)]} if req.logprobs else None
                yield chunk({"content": token}, lp)
            yield chunk({}, None, finish)
            if req.stream_options is not None and req.stream_options.include_usage:
                tail = {**head, "choices": [], "usage": _usage(prompt_tokens, len(words))}
                yield b"data: " + _dumps(tail).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            self._running.dec()
            if not done:
                self.cancelled += 1


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _client_left(request: Request, delay: float) -> bool:
    """Wait ``delay`` seconds; ``True`` (at once) if the client disconnects meanwhile."""
    receive = request.receive

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait((watcher,), timeout=delay)
        return bool(done)
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a fake vLLM OpenAI-compatible pool.")
    for flag, kind, default in (
        ("--host", str, "127.0.0.1"),
        ("--port", int, 8000),
        ("--visual-tokens", int, 16),
        ("--model", str, "foveal-ref"),
        ("--latency-s", float, 0.0),
        ("--chunk-delay-s", float, 0.0),
        ("--answer", str, "a fake answer"),
        ("--log-level", str, "warning"),
    ):
        parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args(argv)
    import uvicorn

    script = FakeScript(args.answer, latency_s=args.latency_s, chunk_delay_s=args.chunk_delay_s)
    pool = FakePool(model=args.model, visual_tokens=args.visual_tokens, script=script, record=False)
    uvicorn.run(
        pool.app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
