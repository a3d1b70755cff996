"""Per-tier demand from the routers' Prometheus metrics.

The operator scales a tier by what the routers *want* to send it, not by what its pods
received: ``foveal_router_tier_demand_total{tier}`` counts requests whose policy chose the
tier before any fallback, so a cold tier at zero replicas still shows demand and wakes up.
``foveal_router_requests_inflight{tier}`` adds the concurrent load. Counters become rates
from deltas between scrapes; a counter that went down (router restarted) counts from zero.

A router that does not answer must not look like "no demand" (that would scale tiers to
zero during a network blip): its last known numbers stay in the sum and the tier's demand is
marked stale, which the autoscaler never scales down on (see :mod:`foveal.operator.scaling`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from foveal.operator.scaling import DemandObservation

__all__ = [
    "DEMAND_COUNTER",
    "INFLIGHT_GAUGE",
    "DemandTracker",
    "RouterMetrics",
    "RouterStatus",
    "parse_router_metrics",
    "scrape",
]

DEMAND_COUNTER = "foveal_router_tier_demand_total"
INFLIGHT_GAUGE = "foveal_router_requests_inflight"
# Older routers without the demand counter: routed requests (after fallback) are the best
# remaining signal, although they cannot show demand for a cold tier.
ROUTED_COUNTER = "foveal_router_requests_total"


@dataclass(frozen=True, slots=True)
class RouterMetrics:
    """One scrape of one router: cumulative demand counters and in-flight gauges by tier."""

    demand_total: Mapping[str, float]
    in_flight: Mapping[str, float]
    counter_name: str = DEMAND_COUNTER  # which counter the totals came from


def parse_router_metrics(text: str) -> RouterMetrics:
    """Sum the samples by their ``tier`` label (other labels, e.g. edge, are added up).

    Raises ValueError when the text is not Prometheus exposition format.
    """
    demand: dict[str, float] = {}
    routed: dict[str, float] = {}
    inflight: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tier = sample.labels.get("tier")
            if tier is None or math.isnan(sample.value):
                continue
            if sample.name == DEMAND_COUNTER:
                demand[tier] = demand.get(tier, 0.0) + sample.value
            elif sample.name == ROUTED_COUNTER:
                routed[tier] = routed.get(tier, 0.0) + sample.value
            elif sample.name == INFLIGHT_GAUGE:
                inflight[tier] = inflight.get(tier, 0.0) + sample.value
    if demand or not routed:
        return RouterMetrics(demand, inflight, DEMAND_COUNTER)
    return RouterMetrics(routed, inflight, ROUTED_COUNTER)


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float) -> RouterMetrics:
    """GET one router's /metrics; raises on connection errors, non-200 or unparsable text."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        text = await resp.text()
    return parse_router_metrics(text)


@dataclass(slots=True)
class RouterStatus:
    """What the tracker knows about one router URL."""

    url: str
    reachable: bool = False
    error: str | None = None
    last_ok_at: float | None = None  # wall clock of the last good scrape
    totals: dict[str, float] = field(default_factory=dict)
    totals_at: float | None = None  # monotonic time of ``totals``
    rates: dict[str, float] | None = None  # None until two good scrapes gave a delta
    in_flight: dict[str, float] = field(default_factory=dict)


class DemandTracker:
    """Turns successive scrapes of several routers into per-tier demand.

    Deterministic given its inputs: :meth:`observe` / :meth:`observe_failure` take the clock
    values, and :meth:`refresh` (the I/O) only feeds them. Not thread-safe; one event loop.
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        timeout_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.routers = {u: RouterStatus(u) for u in dict.fromkeys(urls)}
        self.timeout_s = timeout_s
        self._monotonic = monotonic
        self._wall = wall
        self._lock = asyncio.Lock()
        self.last_refresh: float | None = None  # monotonic
        self.observed_at: float | None = None  # wall clock of the last refresh

    @property
    def configured(self) -> bool:
        return bool(self.routers)

    def observe(self, url: str, metrics: RouterMetrics, *, now: float, wall: float) -> None:
        """Record a good scrape of ``url`` at monotonic time ``now``."""
        r = self.routers[url]
        if r.totals_at is not None and now > r.totals_at:
            dt = now - r.totals_at
            rates = {}
            for tier, total in metrics.demand_total.items():
                before = r.totals.get(tier, 0.0)
                # A counter below its last value means the router restarted: it counted
                # ``total`` requests since then, all inside this interval at most.
                delta = total - before if total >= before else total
                rates[tier] = max(0.0, delta) / dt
            r.rates = rates
        r.totals = dict(metrics.demand_total)
        r.totals_at = now
        r.in_flight = dict(metrics.in_flight)
        r.reachable, r.error, r.last_ok_at = True, None, wall

    def observe_failure(self, url: str, error: str) -> None:
        """``url`` did not answer: keep its last numbers (they still count), mark it down."""
        r = self.routers[url]
        r.reachable, r.error = False, error

    def demand(self, tier: str) -> DemandObservation | None:
        """Summed demand for ``tier``; None when no router has ever answered (unknown)."""
        known = [r for r in self.routers.values() if r.last_ok_at is not None]
        if not known:
            return None
        rps = sum((r.rates or {}).get(tier, 0.0) for r in known)
        inflight = sum(r.in_flight.get(tier, 0.0) for r in known)
        stale = len(known) < len(self.routers) or any(
            not r.reachable or r.rates is None for r in known
        )
        return DemandObservation(requests_per_second=rps, in_flight=inflight, stale=stale)

    def problems(self) -> list[str]:
        """Human-readable lines for routers that are down or not scraped successfully yet."""
        out = []
        for r in self.routers.values():
            if not r.reachable:
                since = "never answered" if r.last_ok_at is None else "using its last numbers"
                out.append(f"router metrics {r.url} unreachable ({r.error}); {since}")
        return out

    async def refresh(self, session: aiohttp.ClientSession, *, max_age_s: float = 0.0) -> None:
        """Scrape every router concurrently, unless the last refresh is younger than
        ``max_age_s`` (one scrape per autoscaler pass, shared by every pool)."""
        async with self._lock:
            now = self._monotonic()
            if self.last_refresh is not None and now - self.last_refresh < max_age_s:
                return
            urls = list(self.routers)
            results = await asyncio.gather(
                *(scrape(session, u, self.timeout_s) for u in urls), return_exceptions=True
            )
            now, wall = self._monotonic(), self._wall()
            for url, result in zip(urls, results, strict=True):
                if isinstance(result, RouterMetrics):
                    self.observe(url, result, now=now, wall=wall)
                else:
                    self.observe_failure(url, _describe(result))
            self.last_refresh, self.observed_at = now, wall


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
