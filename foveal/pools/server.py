"""The reference pool server: the pool contract over HTTP, in front of a :class:`PoolEngine`.

Endpoints (OpenAI-compatible, the same wire schema as vLLM and the fake pool):

- ``POST /v1/chat/completions`` — one image (a ``data:image/...;base64`` URI) and text;
  ``stream``, ``logprobs``/``top_logprobs``, ``max_tokens``/``max_completion_tokens``, ``stop``.
  ``usage.prompt_tokens`` counts the visual tokens of the tier plus the prompt's text tokens.
- ``GET /v1/models`` — the served model; ``GET /health`` — 200 ready, 503 draining;
  ``GET /metrics`` — the engine's ``foveal_pool_server_…`` metrics (its own registry).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input (the message names the field), 404 for another model, 429 (+ ``Retry-After``) when the
queue is full, 503 once the engine drains.

The reference model answers one question about one image with greedy decoding: the question is
the text of the user messages joined by spaces (system and assistant turns are ignored), and
``temperature``/``top_p``/``seed`` are accepted and have no effect. ``top_logprobs: N`` lists
the N most likely tokens at each step, most likely first (the generated one is the first: the
decoding is greedy).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from foveal.pools.chat_schema import ChatParams, ImagePart, Part, TextPart
from foveal.pools.engine import Completion, NotAccepting, PoolEngine, QueueFull, token_bytes
from foveal.pools.reference.data import image_tensor
from foveal.pools.reference.tokenizer import Tokenizer

__all__ = ["PoolServer", "create_pool_app", "decode_image", "parse_chat"]

logger = logging.getLogger(__name__)

_encoder = json.JSONEncoder(separators=(",", ":"))
_dumps = _encoder.encode
_INLINE_DECODE_BYTES = 256 * 1024  # larger images are decoded in a worker thread


# -- the request schema (OpenAI chat completions, the parts a pool serves) ---------------


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[Part] | None = None


class ChatRequest(ChatParams):
    """The accepted body; unknown fields are ignored, as vLLM does."""

    messages: list[_Message] = Field(min_length=1)


class BadRequest(Exception):
    """Bad input; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        first = first or loc or None
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return f"{exc.error_count()} validation error(s): " + "; ".join(parts), first


# -- parsing -------------------------------------------------------------------------------


def decode_image(url: str, size: int, param: str = "image_url.url") -> torch.Tensor:
    """A ``data:image/<type>;base64,<data>`` URI as a (3, size, size) tensor in [0, 1]."""
    if not url.startswith("data:"):
        raise BadRequest(
            "only data: image URLs are supported by this pool (the router inlines remote images)",
            param,
        )
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise BadRequest("invalid image data URI: expected data:image/<type>;base64,<data>", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"invalid base64 image data: {exc}", param) from None
    mime = header[5:-7]
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return image_tensor([img], size)[0]
    except UnidentifiedImageError:
        raise BadRequest(
            f"unsupported image: the data (declared {mime}) is no image format Pillow reads",
            param,
        ) from None
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"image too large: {exc}", param) from None
    except Exception as exc:  # truncated or corrupt data: Pillow raises many kinds
        raise BadRequest(f"broken {mime} image: {type(exc).__name__}: {exc}", param) from None


def parse_chat(req: ChatRequest) -> tuple[str, str, str]:
    """(image data URI, question, the image's field path) of a request with exactly one image."""
    texts: list[str] = []
    images: list[tuple[str, str]] = []
    for i, msg in enumerate(req.messages):
        content = msg.content
        if content is None or msg.role not in ("user",):
            if isinstance(content, list) and any(isinstance(p, ImagePart) for p in content):
                raise BadRequest(
                    f"images are only read from user messages, not {msg.role} messages",
                    f"messages.{i}.content",
                )
            continue
        if isinstance(content, str):
            texts.append(content)
            continue
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                texts.append(part.text)
            else:
                images.append((part.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
    if len(images) != 1:
        raise BadRequest(
            f"this reference pool needs exactly one image per request, got {len(images)}",
            "messages",
        )
    question = " ".join(t.strip() for t in texts if t.strip())
    return images[0][0], question, images[0][1]


# -- responses -----------------------------------------------------------------------------


def _usage(c: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def _logprobs(c: Completion, tokenizer: Tokenizer, top: int) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content`` of a completion: each token with its ``top`` alternatives."""

    def alternative(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(raw)}

    entries = []
    for i, (token, raw, lp) in enumerate(zip(c.tokens, c.token_bytes, c.logprobs, strict=True)):
        alts = c.alternatives[i][:top] if top > 0 and i < len(c.alternatives) else []
        entries.append(
            {
                "token": token,
                "logprob": lp,
                "bytes": list(raw),
                "top_logprobs": [alternative(t, a) for t, a in alts],
            }
        )
    return entries


def _deltas(c: Completion, decode: Any) -> list[str]:
    """Text added by each token; a partial UTF-8 character waits for the token completing it."""
    out, shown = [], ""
    for n in range(1, len(c.token_ids) + 1):
        text = c.text if n == len(c.token_ids) else decode(c.token_ids[:n])
        if n < len(c.token_ids) and text.endswith("\ufffd"):
            out.append("")
            continue
        out.append(text[len(shown) :] if text.startswith(shown) else text)
        shown = text
    return out


# -- the app -------------------------------------------------------------------------------


def create_pool_app(engine: PoolEngine, *, manage_engine: bool = True) -> FastAPI:
    """The pool contract's HTTP app over ``engine``.

    With ``manage_engine`` the app's lifespan starts the engine and, at shutdown, drains and
    closes it; a host that owns the engine (a Ray Serve replica) passes ``False``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.close()

    app = FastAPI(
        title=f"Foveal reference pool ({engine.tier})",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.stopping = False  # set by the server on SIGTERM: /health turns 503
    created = int(time.time())
    size = engine.image_size
    tokenizer = engine.model.tokenizer

    @app.get("/health")
    async def health() -> Response:
        if engine.ready and not app.state.stopping:
            return Response(status_code=200)
        return Response("draining\n", status_code=503, headers={"Retry-After": "1"})

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": engine.model_name,
            "object": "model",
            "created": created,
            "owned_by": "foveal",
            "root": engine.model_name,
            "parent": None,
            "max_model_len": engine.model.config.max_text + engine.visual_tokens,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"invalid JSON body: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "BadRequestError")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            return _error(400, message, "BadRequestError", param)
        if req.model != engine.model_name:
            return _error(
                404,
                f"the model `{req.model}` does not exist; this pool serves `{engine.model_name}`",
                "NotFoundError",
                "model",
            )
        if not engine.ready:
            return _unavailable(engine)
        try:
            url, question, param = parse_chat(req)
            if len(url) > _INLINE_DECODE_BYTES:
                image = await run_in_threadpool(decode_image, url, size, param)
            else:
                image = decode_image(url, size, param)
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError", exc.param)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            completion = await engine.generate(
                image, question, max_tokens=req.max_tokens or req.max_completion_tokens, stop=stop
            )
        except QueueFull as exc:
            retry = {"Retry-After": str(exc.retry_after_s)}
            return _error(429, str(exc), "RateLimitError", None, retry)
        except NotAccepting:
            return _unavailable(engine)
        except Exception as exc:
            logger.exception("generation failed")
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}", "InternalError")
        cid = "chatcmpl-" + os.urandom(16).hex()
        top = req.top_logprobs or 0
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = _sse(
                engine.model_name,
                cid,
                completion,
                tokenizer,
                logprobs=bool(req.logprobs),
                top=top,
                usage=usage,
            )
            return StreamingResponse(chunks, media_type="text/event-stream")
        logprobs: dict[str, Any] | None = None
        if req.logprobs:
            logprobs = {"content": _logprobs(completion, tokenizer, top)}
        reply = {"role": "assistant", "content": completion.text}
        choice: dict[str, Any] = {
            "index": 0,
            "message": reply,
            "logprobs": logprobs,
            "finish_reason": completion.finish_reason,
        }
        answer = {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.model_name,
            "choices": [choice],
            "usage": _usage(completion),
        }
        return Response(_dumps(answer), media_type="application/json")

    return app


def _unavailable(engine: PoolEngine) -> JSONResponse:
    return _error(
        503,
        f"the {engine.tier} pool is shutting down and takes no new requests",
        "ServiceUnavailableError",
        None,
        {"Retry-After": "1"},
    )


async def _sse(
    model: str,
    cid: str,
    c: Completion,
    tokenizer: Tokenizer,
    *,
    logprobs: bool,
    top: int,
    usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE chunks of a finished completion: role, one chunk per token, finish, usage.

    The reference engine answers a whole batch at once, so the chunks follow each other
    without waiting; the format is vLLM's, token by token.
    """
    head = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time())}
    head["model"] = model

    def chunk(delta: dict[str, Any], lp: Any = None, fin: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": fin}
        return b"data: " + _dumps({**head, "choices": [choice]}).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    deltas = _deltas(c, tokenizer.decode)
    entries = _logprobs(c, tokenizer, top) if logprobs else [None] * len(deltas)
    for delta, entry in zip(deltas, entries, strict=True):
        yield chunk({"content": delta}, {"content": [entry]} if entry else None)
    yield chunk({}, None, c.finish_reason)
    if usage:
        tail = {**head, "choices": [], "usage": _usage(c)}
        yield b"data: " + _dumps(tail).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


# -- serving -------------------------------------------------------------------------------


class _DrainingServer(uvicorn.Server):
    """uvicorn whose exit signal also turns the app's /health to 503 at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.pool_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's own: it records the signal and raises it again after shutdown, which
        # would end a cleanly drained process with "killed by SIGTERM" instead of status 0.
        self.pool_app.state.stopping = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        else:
            self.should_exit = True


class PoolServer:
    """One engine served by uvicorn on ``host:port`` (0 = a free port, known after bind).

    :meth:`run` serves in the calling (main) thread until SIGTERM/SIGINT; :meth:`start` serves
    from a thread (tests, benchmarks) until :meth:`stop`. Either way the shutdown is graceful:
    ``/health`` answers 503, uvicorn stops listening (new connections are refused), closes idle
    connections and waits for every request already received to be answered (queued ones
    included); then the app's lifespan drains and closes the engine.
    """

    def __init__(
        self,
        engine: PoolEngine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        access_log: bool = False,
    ) -> None:
        self.engine = engine
        self.host = host
        self.app = create_pool_app(engine)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level=log_level,
            access_log=access_log,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=None,  # wait for every request in flight
        )
        self.server = _DrainingServer(config, self.app)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
            self._sock.listen(2048)  # connections wait in the backlog until uvicorn runs
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (handled by uvicorn in the main thread), then drain."""
        try:
            self.server.run(sockets=[self._sock])
        finally:
            self._sock.close()

    def start(self, timeout_s: float = 30.0) -> PoolServer:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.run, name=f"pool-{self.port}", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"pool server on {self.url} failed to start")
            if time.monotonic() > end:
                raise TimeoutError(f"pool server on {self.url} did not start in {timeout_s}s")
            time.sleep(0.005)
        return self

    def begin_stop(self) -> None:
        """Start a graceful shutdown, as SIGTERM does; :meth:`join` waits for its end."""
        self.server.handle_exit(signal.SIGTERM, None)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the serving thread to end; ``True`` when it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful shutdown, waiting up to ``timeout_s`` for in-flight requests."""
        self.begin_stop()
        if not self.join(timeout_s):
            logger.warning("pool server on %s did not stop within %ss", self.url, timeout_s)

    def __enter__(self) -> PoolServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
