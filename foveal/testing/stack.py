"""The local stack: router (gateway + gRPC) over local pools, all on loopback.

``foveal up`` runs it on embedded defaults; tests run it on port 0 with scripted fake pools.
Tiers without configured endpoints get a local pool each: today the FakePool (labelled as a
fake everywhere it shows), until the reference VLM pools land.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foveal.config import EndpointSettings, Settings, load_settings
from foveal.router.app import RouterApp
from foveal.router.core import RouterCore
from foveal.testing.fakepool import FakePool, FakeScript
from foveal.testing.servers import ServerThread

__all__ = ["LocalPool", "LocalStack", "running_stack"]


@dataclass
class LocalPool:
    tier: str
    pool: FakePool
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class LocalStack:
    settings: Settings
    pools: dict[str, list[LocalPool]] = field(default_factory=dict)
    router: RouterApp | None = None
    record_requests: bool = True  # keep every body a fake pool receives (tests); off for `up`

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

    async def start(self, replicas: int = 1) -> None:
        tiers = []
        for tier in self.settings.tiers:
            if tier.endpoints:
                tiers.append(tier)
                continue
            local = []
            for _ in range(replicas):
                pool = FakePool(
                    model=tier.model,
                    visual_tokens=tier.visual_tokens,
                    script=FakeScript(),
                    record=self.record_requests,
                )
                server = ServerThread(pool.app)
                server.start()
                local.append(LocalPool(tier.name, pool, server))
            self.pools[tier.name] = local
            endpoints = [EndpointSettings(url=p.url, model=None) for p in local]
            tiers.append(tier.model_copy(update={"endpoints": endpoints, "backend": "fake"}))
        self.settings = self.settings.model_copy(update={"tiers": tiers})
        self.router = RouterApp(self.settings)
        await self.router.start()

    async def stop(self) -> None:
        if self.router is not None:
            await self.router.stop()
        for local in self.pools.values():
            for p in local:
                p.server.stop()


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
    *, replicas: int = 1, store_url: str | None = None, **overrides: Any
) -> AsyncIterator[LocalStack]:
    """A whole stack on 127.0.0.1 port 0 with a fresh SQLite store (or ``store_url``).

    ``overrides`` are nested settings, e.g. ``auth={"enabled": True}``.
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
        }
        stack = LocalStack(load_settings(**_merge(base, overrides)))
        try:
            await stack.start(replicas=replicas)
            yield stack
        finally:
            await stack.stop()
