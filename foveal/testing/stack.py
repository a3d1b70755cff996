"""The local stack: router (gateway + gRPC) over local pools, all on loopback.

``foveal up`` runs it on embedded defaults; tests run it on port 0 with scripted fake pools.
Tiers without configured endpoints get a local pool each, of the tier's ``backend``:
``reference`` (the default) serves the reference VLM through the real pool server, the
checkpoint loaded once and shared by every tier, forward passes taking turns on
``local_pools.workers`` threads; ``fake`` serves the FakePool (labelled as a fake everywhere it
shows). :func:`running_stack` uses fake pools unless told otherwise.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from foveal.config import EndpointSettings, Settings, TierSettings, load_settings
from foveal.router.app import RouterApp
from foveal.router.core import RouterCore
from foveal.testing.fakepool import FakePool, FakeScript
from foveal.testing.servers import ServerThread

if TYPE_CHECKING:
    from foveal.pools.engine import PoolEngine
    from foveal.pools.reference.model import ReferenceVLM

__all__ = ["LocalPool", "LocalStack", "running_stack"]

PoolBackend = Literal["reference", "fake"]


@dataclass
class LocalPool:
    tier: str
    pool: FakePool | PoolEngine  # the FakePool, or the reference pool's batching engine
    server: ServerThread
    backend: PoolBackend = "fake"

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class LocalStack:
    settings: Settings
    pools: dict[str, list[LocalPool]] = field(default_factory=dict)
    router: RouterApp | None = None
    record_requests: bool = True  # keep every body a fake pool receives (tests); off for `up`
    pool_backend: PoolBackend | None = None  # local pools of this backend; None: each tier's
    _model: ReferenceVLM | None = field(default=None, init=False, repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @property
    def core(self) -> RouterCore:
        assert self.router is not None and self.router.core is not None
        return self.router.core

    @property
    def http_url(self) -> str:
        assert self.router is not None
        return self.router.http_url

    @property
    def grpc_target(self) -> str:
        assert self.router is not None
        return self.router.grpc_target

    def pool(self, tier: str, replica: int = 0) -> LocalPool:
        return self.pools[tier][replica]

    def backend_of(self, tier: TierSettings) -> str:
        """The backend of the local pool a tier without endpoints gets."""
        return self.pool_backend or tier.backend

    async def start(self, replicas: int = 1) -> None:
        """Start the local pools, then the router over them.

        A tier without endpoints whose backend is vllm cannot run locally (ValueError); a
        missing reference checkpoint raises FileNotFoundError naming the setting to change.
        """
        local_tiers = [t for t in self.settings.tiers if not t.endpoints]
        vllm = [t.name for t in local_tiers if self.backend_of(t) == "vllm"]
        if vllm:
            raise ValueError(
                f"tiers {vllm} use the vllm backend but have no endpoints; `foveal up` runs "
                "only reference or fake pools locally (give the tiers endpoints, or --pools)"
            )
        if any(self.backend_of(t) == "reference" for t in local_tiers):
            await self._load_model()
        tiers = []
        for tier in self.settings.tiers:
            if tier.endpoints:
                tiers.append(tier)
                continue
            backend: PoolBackend = "reference" if self.backend_of(tier) == "reference" else "fake"
            local = [self._start_pool(tier, backend) for _ in range(replicas)]
            self.pools[tier.name] = local
            endpoints = [EndpointSettings(url=p.url, model=None) for p in local]
            tiers.append(tier.model_copy(update={"endpoints": endpoints, "backend": backend}))
        self.settings = self.settings.model_copy(update={"tiers": tiers})
        self.router = RouterApp(self.settings)
        await self.router.start()

    async def _load_model(self) -> None:
        import torch

        from foveal.pools.reference.checkpoint import SHIPPED, load_checkpoint

        cfg = self.settings.local_pools
        path = Path(cfg.checkpoint) if cfg.checkpoint else SHIPPED
        if not path.is_file():
            raise FileNotFoundError(
                f"the reference pools need a checkpoint and there is none at {path}: train one "
                f"(`foveal vlm train --out {path}`), point local_pools.checkpoint "
                "(FOVEAL_LOCAL_POOLS__CHECKPOINT or `foveal up --checkpoint`) at one, or run "
                "fake pools (`foveal up --pools fake`)"
            )
        torch.set_num_threads(cfg.threads)
        self._model = await asyncio.to_thread(load_checkpoint, path)
        self._executor = ThreadPoolExecutor(cfg.workers, thread_name_prefix="local-pools")

    def _start_pool(self, tier: TierSettings, backend: PoolBackend) -> LocalPool:
        if backend == "fake":
            pool = FakePool(
                model=tier.model,
                visual_tokens=tier.visual_tokens,
                script=FakeScript(),
                record=self.record_requests,
            )
            server = ServerThread(pool.app)
            server.start()
            return LocalPool(tier.name, pool, server, "fake")
        from foveal.pools.engine import EngineSettings, PoolEngine
        from foveal.pools.server import create_pool_app

        assert self._model is not None
        cfg = self.settings.local_pools
        engine = PoolEngine(
            self._model,
            visual_tokens=tier.visual_tokens,
            mechanism=cfg.mechanism,
            model_name=tier.model,
            tier=tier.name,
            settings=EngineSettings(
                max_batch=cfg.max_batch,
                batch_wait_ms=cfg.batch_wait_ms,
                max_queue=cfg.max_queue,
                max_new_tokens=cfg.max_new_tokens,
                threads=cfg.threads,
            ),
            executor=self._executor,
        )
        server = ServerThread(create_pool_app(engine), lifespan="on")
        server.start()
        return LocalPool(tier.name, engine, server, "reference")

    async def stop(self) -> None:
        if self.router is not None:
            await self.router.stop()
        for local in self.pools.values():
            for p in local:
                p.server.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@asynccontextmanager
async def running_stack(
    *,
    replicas: int = 1,
    store_url: str | None = None,
    pool_backend: PoolBackend | None = "fake",
    **overrides: Any,
) -> AsyncIterator[LocalStack]:
    """A whole stack on 127.0.0.1 port 0 with a fresh SQLite store (or ``store_url``).

    Local pools are fake unless ``pool_backend`` says otherwise (``None``: each tier's
    ``backend``). ``overrides`` are nested settings, e.g. ``auth={"enabled": True}``. The stack
    routes with the rule policy unless ``policy={"name": ...}`` overrides it: fake pools answer
    canned text, so the learned default would route on signal that is not there.
    """
    with tempfile.TemporaryDirectory(prefix="foveal-stack-") as tmp:
        base: dict[str, Any] = {
            "gateway": {"host": "127.0.0.1", "port": 0},
            "grpc": {"host": "127.0.0.1", "port": 0},
            "store": {
                "url": store_url or f"sqlite:///{Path(tmp) / 'foveal.db'}",
                "batch_interval_s": 0.01,
            },
            "pool_client": {
                "health_interval_s": 0.2,
                "breaker_reset_s": 1.0,
                "request_timeout_s": 10.0,
            },
            "policy": {"name": "rules"},
        }
        stack = LocalStack(load_settings(**_merge(base, overrides)), pool_backend=pool_backend)
        try:
            await stack.start(replicas=replicas)
            yield stack
        finally:
            await stack.stop()
