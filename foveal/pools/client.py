"""The HTTP client in front of the pools: endpoint choice, retries, tier fallback, deadlines.

One pooled aiohttp session serves every request. For each tier in the order given, the client
tries the tier's available endpoints (healthy, breaker letting a request go), least in-flight
first with ties taken round-robin, then moves on to the next tier. Endpoints that are down are
skipped without a network call, so a dead pool costs nothing once its breaker is open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from foveal.config import PoolClientSettings
from foveal.errors import InvalidRequest, NoEligiblePool, PoolTimeout
from foveal.metrics import POOL_ENDPOINTS_AVAILABLE, POOL_REQUEST_SECONDS
from foveal.pools.catalog import CatalogHolder, Endpoint, Tier
from foveal.pools.health import EndpointState, EndpointStates, check_endpoints, health_loop
from foveal.pools.stream import PoolStream, error_counter

__all__ = ["PoolClient", "PoolResult", "PoolStream"]

logger = logging.getLogger(__name__)

try:  # optional, faster
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _encoder = json.JSONEncoder(separators=(",", ":"))

    def _dumps(obj: Any) -> bytes:
        return _encoder.encode(obj).encode()

    _loads = json.loads

_HEADERS = {"Content-Type": "application/json"}
_PATH = "/v1/chat/completions"
_NO_CEIL = 1e9
_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class PoolResult:
    tier: str
    endpoint: str
    body: dict[str, Any]  # the pool's chat.completion JSON
    latency_s: float  # time waiting on the pool for the successful attempt
    attempts: int  # attempts made, including failed ones


class _Failed(Exception):
    """One attempt failed in a way that lets the next endpoint try."""

    def __init__(self, kind: str, message: str, *, breaker: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.breaker = breaker


class PoolClient:
    """Sends chat completions to the pools of a catalog; see the module docstring."""

    def __init__(self, catalog: CatalogHolder, settings: PoolClientSettings) -> None:
        self._holder = catalog
        self._settings = settings
        self._states = EndpointStates(settings.breaker_failures, settings.breaker_reset_s)
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._rr: dict[str, int] = {}
        self._gauged: set[str] = set()  # tiers with an endpoints-available gauge
        self._latency: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=s.max_connections_per_endpoint,
            keepalive_timeout=4.0,  # below uvicorn's 5 s, so the server never closes first
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False
        )
        self._health_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=2), trust_env=False
        )
        self._refresh_gauges()
        self._health_task = asyncio.create_task(
            health_loop(self.check_health, s.health_interval_s), name="pool-health"
        )

    async def close(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()
        self._session = self._health_session = None

    async def __aenter__(self) -> PoolClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state -----------------------------------------------------------------------------

    def available(self, tier: str) -> int:
        """Endpoints of ``tier`` that are healthy and whose breaker lets a request go."""
        t = self._holder.snapshot.get(tier)
        if t is None:
            return 0
        peek = self._states.peek
        n = 0
        for ep in t.endpoints:
            st = peek(ep.url)
            if st is None or st.available:
                n += 1
        return n

    def retry_after_s(self, tiers: Sequence[str]) -> float:
        """Seconds until the soonest endpoint of ``tiers`` may take a request again (>= 1)."""
        catalog = self._holder.snapshot
        interval = self._settings.health_interval_s
        soonest: float | None = None
        for name in tiers:
            tier = catalog.get(name)
            for ep in tier.endpoints if tier is not None else ():
                st = self._states.peek(ep.url)
                if st is None:
                    wait = 0.0
                else:
                    wait = st.breaker.retry_after_s()
                    if not st.healthy:
                        wait = max(wait, interval)
                soonest = wait if soonest is None else min(soonest, wait)
        if soonest is None:
            soonest = self._settings.breaker_reset_s
        return max(1.0, soonest)

    def endpoint_state(self, url: str) -> EndpointState:
        """The state kept for an endpoint URL (health, breaker, requests in flight)."""
        return self._states.get(url.rstrip("/"))

    async def check_health(self) -> None:
        """One round of health checks of every endpoint in the catalog (also run periodically)."""
        session = self._health_session
        if session is None:
            raise RuntimeError("PoolClient is not started")
        catalog = self._holder.snapshot
        urls = {ep.url for tier in catalog.tiers for ep in tier.endpoints}
        self._states.prune(urls)
        await check_endpoints(
            session, [self._states.get(u) for u in urls], self._settings.health_timeout_s
        )
        self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        names = set()
        for tier in self._holder.snapshot.tiers:
            POOL_ENDPOINTS_AVAILABLE.labels(tier.name).set(self.available(tier.name))
            names.add(tier.name)
        for gone in self._gauged - names:  # a tier that left a swapped catalog
            try:
                POOL_ENDPOINTS_AVAILABLE.remove(gone)
            except KeyError:
                pass
        self._gauged = names

    # -- requests --------------------------------------------------------------------------

    async def complete(
        self, tiers: Sequence[str], payload: dict[str, Any], *, deadline: float
    ) -> PoolResult:
        """A non-streaming chat completion from the first tier/endpoint that answers."""
        result = await self._dispatch(tiers, payload, deadline, stream=False)
        assert isinstance(result, PoolResult)
        return result

    async def stream(
        self, tiers: Sequence[str], payload: dict[str, Any], *, deadline: float
    ) -> PoolStream:
        """A streaming chat completion; returns once an endpoint answered 200 (headers)."""
        result = await self._dispatch(tiers, payload, deadline, stream=True)
        assert isinstance(result, PoolStream)
        return result

    def _order(self, tier: Tier) -> list[tuple[Endpoint, EndpointState]]:
        get = self._states.get
        pairs = [(ep, get(ep.url)) for ep in tier.endpoints]
        n = len(pairs)
        if n > 1:
            k = self._rr.get(tier.name, 0)
            self._rr[tier.name] = (k + 1) % n
            if k:
                pairs = pairs[k:] + pairs[:k]
            pairs.sort(key=_inflight)  # stable: ties stay in round-robin order
        return pairs

    async def _dispatch(
        self, tiers: Sequence[str], payload: dict[str, Any], deadline: float, *, stream: bool
    ) -> PoolResult | PoolStream:
        session = self._session
        if session is None:
            raise RuntimeError("PoolClient is not started")
        catalog = self._holder.snapshot
        attempts = 0
        tried: list[str] = []
        cold: list[str] = []  # tiers with no endpoint at all (no ready replica)
        errors: list[str] = []
        body: bytes = b""
        body_model: str | None = None
        for name in tiers:
            tier = catalog.get(name)
            if tier is None:
                continue
            tried.append(name)
            if not tier.endpoints:
                cold.append(name)
            for ep, st in self._order(tier):
                if not st.healthy or not st.breaker.acquire():
                    continue
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    st.breaker.release()
                    raise PoolTimeout(f"deadline passed after {attempts} pool attempt(s)")
                if ep.model != body_model:
                    body = _dumps({**payload, "model": ep.model})
                    body_model = ep.model
                attempts += 1
                try:
                    return await self._attempt(
                        session, tier.name, ep, st, body, remaining, attempts, stream
                    )
                except _Failed as failure:
                    if failure.breaker:
                        if st.breaker.record_failure():
                            self._refresh_gauges()
                    else:
                        st.breaker.release()
                    error_counter(tier.name, failure.kind).inc()
                    errors.append(f"{ep.url}: {failure}")
                    logger.info("pool attempt failed (tier %s): %s: %s", name, ep.url, failure)
                    if failure.kind == "timeout":
                        raise PoolTimeout(
                            f"no answer from tier {name} before the deadline "
                            f"({attempts} attempt(s))"
                        ) from None
        if _monotonic() >= deadline:
            raise PoolTimeout(f"deadline passed after {attempts} pool attempt(s)")
        retry = self.retry_after_s(tiers)
        what = ", ".join(tried) if tried else f"none known of {', '.join(tiers) or '(none)'}"
        detail = f"; last error: {errors[-1]}" if errors else "; no endpoint available"
        if cold:
            detail += f"; no ready replica in tier {', '.join(cold)} (scaled to zero or starting)"
        raise NoEligiblePool(
            f"no pool endpoint could serve the request (tiers tried: {what}{detail})",
            retry_after_s=retry,
        )

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        tier: str,
        ep: Endpoint,
        st: EndpointState,
        body: bytes,
        remaining: float,
        attempts: int,
        stream: bool,
    ) -> PoolResult | PoolStream:
        """One POST to one endpoint. Raises :class:`_Failed` when the next endpoint may try."""
        timeout = aiohttp.ClientTimeout(
            total=remaining,
            sock_connect=min(self._settings.connect_timeout_s, remaining),
            ceil_threshold=_NO_CEIL,  # the deadline is exact, not rounded up to a second
        )
        st.inflight += 1
        handed_over = False
        resp: aiohttp.ClientResponse | None = None
        t0 = _monotonic()
        try:
            resp = await session.post(ep.url + _PATH, data=body, headers=_HEADERS, timeout=timeout)
            status = resp.status
            if status == 200 and stream:
                if st.breaker.record_success():
                    self._refresh_gauges()
                elapsed = _monotonic() - t0
                self._observe(tier, elapsed)
                handed_over = True
                return PoolStream(tier, ep.url, attempts, resp, st, elapsed, self._refresh_gauges)
            raw = await resp.read()
            elapsed = _monotonic() - t0
            self._observe(tier, elapsed)
            if status == 200:
                try:
                    data = _loads(raw)
                except ValueError:
                    raise _Failed("protocol", "invalid JSON in a 200 answer") from None
                if not isinstance(data, dict):
                    raise _Failed("protocol", "a 200 answer that is not a JSON object")
                if st.breaker.record_success():
                    self._refresh_gauges()
                return PoolResult(tier, ep.url, data, elapsed, attempts)
            message = _error_message(raw) or f"HTTP {status}"
            if status == 429:
                raise _Failed("status", f"HTTP 429: {message}", breaker=False)
            if status == 408 or status >= 500:
                raise _Failed("status", f"HTTP {status}: {message}")
            # Any other 4xx: the request is at fault; the endpoint itself answered fine.
            st.breaker.record_success()
            error_counter(tier, "status").inc()
            raise InvalidRequest(message)
        except aiohttp.ConnectionTimeoutError:
            self._observe(tier, _monotonic() - t0)
            raise _Failed("connect", "connect timed out") from None
        except aiohttp.ClientConnectorError as exc:
            self._observe(tier, _monotonic() - t0)
            raise _Failed("connect", f"cannot connect: {exc.os_error}") from None
        except TimeoutError:
            self._observe(tier, _monotonic() - t0)
            raise _Failed("timeout", "no answer before the deadline") from None
        except (aiohttp.ClientError, OSError) as exc:
            self._observe(tier, _monotonic() - t0)
            raise _Failed("protocol", f"{type(exc).__name__}: {exc}") from None
        except asyncio.CancelledError:
            st.breaker.release()  # the caller went away: no verdict on the endpoint
            raise
        finally:
            if not handed_over:
                st.inflight -= 1
                if resp is not None:
                    resp.close()  # no-op once the body was read and the connection released

    def _observe(self, tier: str, seconds: float) -> None:
        hist = self._latency.get(tier)
        if hist is None:
            hist = self._latency[tier] = POOL_REQUEST_SECONDS.labels(tier)
        hist.observe(seconds)


def _inflight(pair: tuple[Endpoint, EndpointState]) -> int:
    return pair[1].inflight


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI/vLLM error body (``{"message"}`` or ``{"error":{"message"}}``)."""
    try:
        data = _loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return raw[:300].decode("utf-8", "replace").strip()
