"""Every tier of the reference VLM as ONE Ray Serve application: a deployment per tier.

```
client ─HTTP─► Ray proxy ─► PoolIngress ──handle──► pool-t1   (replicas: engine + pool app)
      /t16/v1/chat/completions   │ (routes by the       pool-t16  (autoscaled per tier)
      /t16/health, /t16/metrics  ┘  first path segment)  ...
```

Each tier deployment runs exactly the torch server's contract: its replicas build the reference
model, a batching :class:`~foveal.pools.engine.PoolEngine` and
:func:`~foveal.pools.server.create_pool_app`, and the ingress hands them each HTTP request as it
came (method, path, headers, body); the replica runs it through the pool app in-process and
returns the answer whole (one round trip) or, for a request that may stream, relays the ASGI
messages as they come. So status codes, errors, SSE streams and ``/health`` are the
pool app's own, and a tier's base URL ``http://host:port/<tier>`` is an endpoint the router's
pool client uses like any other (it appends ``/v1/chat/completions`` and ``/health``).

Each tier deployment autoscales on its own between ``min_replicas`` and ``max_replicas`` on
requests in flight per replica (``target_ongoing_requests``); ``num_cpus`` is the logical CPU
share Ray reserves per replica (fractional, so several tiers fit on a small machine) and sets
torch's threads per replica (at least one). ``/<tier>/metrics`` shows the metrics of whichever
replica answered; Ray's own metrics cover the deployment as a whole.

Ray is imported only when an application is built or started (the ``ray`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

__all__ = [
    "APP_NAME",
    "PoolIngress",
    "RayAutoscaling",
    "RayPoolApp",
    "RayPoolConfig",
    "RayTier",
    "TierReplica",
    "build_app",
    "free_port",
    "parse_tiers",
    "serve_until_signal",
]

logger = logging.getLogger(__name__)

APP_NAME = "foveal-pools"
_TIER = re.compile(r"^t([1-9][0-9]*)$")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"content-length"}
# One ASGI message as it crosses the Ray handle: ("start", status, headers) or ("body", bytes).
Message = tuple[Any, ...]


@dataclass(frozen=True)
class RayAutoscaling:
    """Ray Serve's per-deployment autoscaling and resources; small defaults for a 2-core box."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # one engine batch in flight per replica
    max_ongoing_requests: int = 32  # beyond this Ray queues requests before the replica
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 60.0
    num_cpus: float = 0.2  # logical CPUs Ray reserves per tier replica

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= 1 and >= min_replicas "
                f"({self.min_replicas})"
            )
        if self.target_ongoing_requests <= 0:
            raise ValueError(
                f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}"
            )
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")

    @property
    def torch_threads(self) -> int:
        """torch intra-op threads of one replica: its CPU share, at least one."""
        return max(1, math.floor(self.num_cpus))

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` of one tier deployment."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": max(1, self.min_replicas),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


@dataclass(frozen=True)
class RayTier:
    name: str
    visual_tokens: int

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", self.name):
            raise ValueError(
                f"tier name {self.name!r}: lower-case letters, digits and '-' (a URL path "
                "segment and a Ray deployment name)"
            )
        if self.visual_tokens < 1:
            raise ValueError(f"tier {self.name}: visual_tokens must be >= 1")


def parse_tiers(text: str) -> tuple[RayTier, ...]:
    """``"t1,t4,t16"`` -> tiers; each ``tN`` serves N visual tokens per image."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no tiers given; e.g. --tiers t1,t4,t16,t64,t256")
    tiers = []
    for name in names:
        m = _TIER.match(name)
        if m is None:
            raise ValueError(f"tier {name!r}: expected tN (N visual tokens per image), e.g. t16")
        tiers.append(RayTier(name, int(m.group(1))))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tiers given twice: {', '.join(dupes)}")
    return tuple(tiers)


@dataclass(frozen=True)
class RayPoolConfig:
    """What one Ray Serve application of reference pools serves, and where."""

    tiers: tuple[RayTier, ...]
    mechanism: str = "resolution"
    checkpoint: str | None = None  # None: the shipped checkpoint
    model_name: str = "foveal-ref"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    max_new_tokens: int = 48
    autoscaling: RayAutoscaling = field(default_factory=RayAutoscaling)
    app_name: str = APP_NAME

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("at least one tier is required")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if not 1 <= self.port <= 65535:
            raise ValueError(
                f"port must be in 1..65535 (Ray Serve needs a fixed port), got {self.port}"
            )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def endpoints(self) -> dict[str, str]:
        """Tier name -> the base URL the router's pool client uses for it."""
        return {t.name: f"{self.url}/{t.name}" for t in self.tiers}


# -- the deployments --------------------------------------------------------------------------


class TierReplica:
    """One replica of one tier: the reference model, its batching engine and the pool app."""

    def __init__(self, config: RayPoolConfig, tier: RayTier) -> None:
        import torch

        from foveal.pools.engine import EngineSettings, PoolEngine
        from foveal.pools.reference.checkpoint import load_checkpoint
        from foveal.pools.server import create_pool_app

        threads = config.autoscaling.torch_threads
        torch.set_num_threads(threads)
        model = load_checkpoint(Path(config.checkpoint) if config.checkpoint else None)
        settings = EngineSettings(
            max_batch=config.max_batch,
            batch_wait_ms=config.batch_wait_ms,
            max_queue=config.max_queue,
            max_new_tokens=config.max_new_tokens,
            threads=threads,
        )
        self.engine = PoolEngine(
            model,
            visual_tokens=tier.visual_tokens,
            mechanism=config.mechanism,
            model_name=config.model_name,
            tier=tier.name,
            settings=settings,
        )
        # The replica owns the engine: Ray stops sending requests, waits for those in flight,
        # then calls __del__, which drains and closes it.
        self.app = create_pool_app(self.engine, manage_engine=False)

    async def forward(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Run one HTTP request through the pool app: (status, headers, whole body)."""
        status, out_headers, chunks = 500, [], []
        async for message in call_asgi(self.app, _scope(method, path, query, headers), body):
            if message[0] == "start":
                status, out_headers = message[1], message[2]
            else:
                chunks.append(message[1])
        return status, out_headers, b"".join(chunks)

    async def forward_stream(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[Message]:
        """Like :meth:`forward`, streamed: ``("start", status, headers)``, then body chunks."""
        async for message in call_asgi(self.app, _scope(method, path, query, headers), body):
            yield message

    async def __del__(self) -> None:
        await self.engine.close()


def _scope(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": None,
        "server": None,
    }


async def call_asgi(app: Any, scope: dict[str, Any], body: bytes) -> AsyncGenerator[Message, None]:
    """Call an ASGI app with a whole request body; yield its response messages as they come.

    The app sees the client disconnect when the caller stops iterating (a cancelled request).
    """
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                yield ("start", message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield ("body", bytes(message["body"]))
                if not message.get("more_body", False):
                    break
        await task  # the app's own error, if it failed before answering
    finally:
        gone.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class PoolIngress:
    """The application's HTTP entry: ``/<tier>/<pool path>`` goes to that tier's deployment."""

    def __init__(self, handles: Mapping[str, Any]) -> None:
        self._handles = dict(handles)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        tier, _, rest = path.lstrip("/").partition("/")
        if tier in ("", "health") and not rest:
            # The application's own health and index: which tiers it serves, where.
            if tier == "health":
                return Response(status_code=200)
            return JSONResponse({"tiers": {name: f"/{name}" for name in self._handles}})
        handle = self._handles.get(tier)
        if handle is None:
            known = ", ".join(f"/{n}" for n in self._handles)
            return _error(
                404, f"no tier {tier!r} here; this application serves {known}", "NotFoundError"
            )
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        args = (request.method, "/" + rest, request.url.query.encode(), headers, body)
        if b'"stream"' not in body:  # one round trip for a whole answer (most requests)
            status, out_headers, content = await handle.forward.remote(*args)
            return Response(content, status_code=status, headers=_clean(out_headers))
        # Possibly streamed (SSE): relay the pool app's messages as they come.
        stream = handle.options(stream=True).forward_stream.remote(*args)
        _, status, out_headers = await stream.__anext__()

        async def chunks() -> AsyncIterator[bytes]:
            async for item in stream:
                yield item[1]

        return StreamingResponse(chunks(), status_code=status, headers=_clean(out_headers))


def _clean(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers to relay: all but hop-by-hop ones (and the length, set again)."""
    return {
        k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() not in _HOP_BY_HOP
    }


def build_app(config: RayPoolConfig) -> Any:
    """The Ray Serve application (not started): the ingress bound to one deployment per tier."""
    from ray import serve

    scale = config.autoscaling
    tier_handles = {}
    for tier in config.tiers:
        deployment = serve.deployment(TierReplica).options(  # type: ignore[attr-defined]
            name=f"pool-{tier.name}",
            autoscaling_config=scale.autoscaling_config(),
            max_ongoing_requests=scale.max_ongoing_requests,
            ray_actor_options={"num_cpus": scale.num_cpus},
        )
        tier_handles[tier.name] = deployment.bind(config, tier)
    ingress = serve.deployment(PoolIngress).options(  # type: ignore[attr-defined]
        name="ingress",
        num_replicas=1,
        max_ongoing_requests=max(1000, scale.max_ongoing_requests * len(config.tiers)),
        ray_actor_options={"num_cpus": 0},  # I/O only; the CPUs go to the tiers
    )
    return ingress.bind(tier_handles)


# -- running it -------------------------------------------------------------------------------


class RayPoolApp:
    """Starts Ray (unless already running), Serve on ``host:port`` and the application.

    :meth:`stop` deletes the application, shuts Serve down and, when this object started Ray,
    Ray itself (every worker process with it).
    """

    def __init__(self, config: RayPoolConfig, *, num_cpus: int | None = None) -> None:
        self.config = config
        self.num_cpus = num_cpus
        self._started_ray = False
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return self.config.url

    def endpoints(self) -> dict[str, str]:
        return self.config.endpoints()

    def start(self) -> RayPoolApp:
        import ray
        from ray import serve

        t0 = time.monotonic()
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                num_cpus=self.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1" if self.config.host == "127.0.0.1" else None,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started_ray = True
        try:
            serve.start(http_options={"host": self.config.host, "port": self.config.port})
            serve.run(
                build_app(self.config),
                name=self.config.app_name,
                route_prefix="/",
                logging_config={"log_level": "WARNING", "enable_access_log": False},
            )
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.delete(self.config.app_name)
            with contextlib.suppress(Exception):
                serve.shutdown()
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def __enter__(self) -> RayPoolApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_until_signal(
    config: RayPoolConfig, *, on_ready: Callable[[RayPoolApp], None] | None = None
) -> None:
    """Run the application until SIGINT/SIGTERM, then stop it (in-flight requests finish)."""
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    with RayPoolApp(config) as app:
        # After ray.init: the driver's own SIGTERM handler exits at once (sys.exit), which
        # would cut the shutdown short and orphan Ray's agent processes.
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if on_ready is not None:
                on_ready(app)
            while not stop:
                time.sleep(0.2)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (Ray Serve needs a fixed port; port 0 is not supported)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
