"""Assembles one router process from settings: store, pools, policy, core, and both edges."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

import uvicorn

from foveal.config import Settings
from foveal.pools.catalog import Catalog, CatalogHolder
from foveal.pools.client import PoolClient
from foveal.router import bandit_policy as _bandit_policies  # noqa: F401 (registers them)
from foveal.router.auth import Authenticator
from foveal.router.core import RouterCore
from foveal.router.feedback_tokens import FeedbackTokens
from foveal.router.image_urls import ImageFetcher
from foveal.router.kube_watch import KubeWatcher
from foveal.router.parsing import RequestBuilder
from foveal.router.policies import make_policy
from foveal.router.tenant_policy import TenantPolicies, TenantPolicy, TenantPolicyHolder
from foveal.store import DecisionWriter, Store

__all__ = ["RouterApp", "build_core", "bind_socket"]

log = logging.getLogger(__name__)


def build_core(settings: Settings, catalog: CatalogHolder | None = None) -> RouterCore:
    """A core wired from settings; call ``start_core``/``stop_core`` around its use.

    With ``catalog.source=kubernetes`` the catalog starts empty: :class:`RouterApp` fills it
    (and the tenant policies) from the watched ModelPools and RoutingPolicies.
    """
    if catalog is None:
        static = settings.catalog.source == "static"
        catalog = CatalogHolder(Catalog.from_settings(settings.tiers if static else ()))
    default_policy = TenantPolicy.from_settings(settings.tenant_policy)
    store = Store(settings.store.url)
    fetcher = ImageFetcher(settings.image_urls) if settings.image_urls.enabled else None
    return RouterCore(
        settings=settings,
        catalog=catalog,
        policy=make_policy(settings.policy),
        pools=PoolClient(catalog, settings.pool_client),
        store=store,
        writer=DecisionWriter(
            store,
            interval_s=settings.store.batch_interval_s,
            batch_max=settings.store.batch_max,
            queue_max=settings.store.queue_max,
        ),
        auth=Authenticator(store, settings.auth),
        tokens=FeedbackTokens(settings.auth.feedback_secret, settings.auth.feedback_token_ttl_s),
        builder=RequestBuilder(settings, catalog, fetcher),
        tenant_policies=TenantPolicyHolder(TenantPolicies(default=default_policy)),
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one), so the real port is known up front."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
    # listener says TCP, and without it every response pays a 40 ms delayed-ACK stall.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


@dataclass
class RouterApp:
    """The gateway (HTTP) and the router (gRPC) over one core, in the running event loop."""

    settings: Settings
    core: RouterCore | None = None
    http_url: str = ""
    grpc_target: str = ""
    _server: uvicorn.Server | None = None
    _grpc: object | None = None
    _watcher: KubeWatcher | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        from foveal.router.grpc_service import start_grpc_server
        from foveal.router.http_gateway import create_app

        self.core = core = build_core(self.settings)
        await asyncio.to_thread(core.store.migrate)
        await core.writer.start()
        bind_store = getattr(core.policy, "bind_store", None)
        if bind_store is not None:  # learning policies load (and later save) their state
            await asyncio.to_thread(bind_store, core.store)
        if self.settings.catalog.source == "kubernetes":
            self._watcher = KubeWatcher(
                self.settings.catalog,
                core.catalog,
                core.tenant_policies,
                core.tenant_policies.snapshot.default,
            )
            await asyncio.to_thread(self._watcher.start)
        await core.pools.start()
        await core.auth.start()
        gw = self.settings.gateway
        sock = bind_socket(gw.host, gw.port)
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(core),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self._server.serve(sockets=[sock])))
        while not self._server.started:
            if self._tasks[0].done():
                self._tasks[0].result()
            await asyncio.sleep(0.01)
        self.http_url = f"http://{_url_host(gw.host)}:{port}"
        server, grpc_port = await start_grpc_server(
            core, self.settings.grpc.host, self.settings.grpc.port
        )
        self._grpc = server
        self.grpc_target = f"{_url_host(self.settings.grpc.host)}:{grpc_port}"
        log.info("gateway on %s, gRPC router on %s", self.http_url, self.grpc_target)

    async def stop(self) -> None:
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
            self._watcher = None
        if self._server is not None:
            self._server.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace=2)  # type: ignore[attr-defined]
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        if self.core is not None:
            await self.core.pools.close()
            if self.core.builder.fetcher is not None:
                await self.core.builder.fetcher.close()
            await self.core.writer.close()
            close_policy = getattr(self.core.policy, "close", None)
            if close_policy is not None:  # writes what a learning policy has not saved yet
                await asyncio.to_thread(close_policy)
            await asyncio.to_thread(self.core.store.close)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
