"""Per-tier demand from routers' /metrics: parsing, rates from counters, resets, outages.

The routers here are real HTTP servers on 127.0.0.1 exposing a real prometheus_client
registry with the router's metric names.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from foveal.operator.demand import DemandTracker, RouterMetrics, parse_router_metrics


@dataclass
class FakeRouterMetrics:
    """A router's metric families, as the router registers them."""

    registry: CollectorRegistry
    demand: Counter
    inflight: Gauge
    routed: Counter


def router_metrics(with_demand: bool = True) -> FakeRouterMetrics:
    reg = CollectorRegistry()
    demand = Counter(
        "foveal_router_tier_demand_total" if with_demand else "unrelated_total",
        "demand",
        ["tier"],
        registry=reg,
    )
    inflight = Gauge("foveal_router_requests_inflight", "in flight", ["tier"], registry=reg)
    routed = Counter(
        "foveal_router_requests_total", "routed", ["edge", "tier", "outcome"], registry=reg
    )
    return FakeRouterMetrics(reg, demand, inflight, routed)


@pytest.fixture
def router_runner() -> list[web.AppRunner]:
    """Holds the router fixture's runner, so a test can stop the router early."""
    return []


@pytest.fixture
async def router(
    router_runner: list[web.AppRunner],
) -> AsyncIterator[tuple[str, FakeRouterMetrics]]:
    metrics = router_metrics()

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    router_runner.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/metrics", metrics
    finally:
        await runner.cleanup()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"  # nothing listens there any more


def test_parse_sums_by_tier() -> None:
    m = router_metrics()
    m.demand.labels(tier="t4").inc(3)
    m.demand.labels(tier="t64").inc(5)
    m.inflight.labels(tier="t4").set(2)
    m.routed.labels(edge="http", tier="t4", outcome="ok").inc(7)
    parsed = parse_router_metrics(generate_latest(m.registry).decode())
    assert parsed.demand_total == {"t4": 3.0, "t64": 5.0}
    assert parsed.in_flight == {"t4": 2.0}
    assert parsed.counter_name == "foveal_router_tier_demand_total"


def test_parse_falls_back_to_routed_requests_for_old_routers() -> None:
    m = router_metrics(with_demand=False)
    m.routed.labels(edge="http", tier="t4", outcome="ok").inc(2)
    m.routed.labels(edge="grpc", tier="t4", outcome="error").inc(1)
    parsed = parse_router_metrics(generate_latest(m.registry).decode())
    assert parsed.demand_total == {"t4": 3.0}
    assert parsed.counter_name == "foveal_router_requests_total"


def test_parse_rejects_text_that_is_not_prometheus() -> None:
    with pytest.raises(ValueError):
        parse_router_metrics("<html>not metrics</html>\n")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rates_from_counter_deltas_and_resets() -> None:
    tracker = DemandTracker(["r1"])
    assert tracker.demand("t4") is None  # nobody answered yet: unknown, not zero
    tracker.observe("r1", RouterMetrics({"t4": 100.0}, {"t4": 3.0}), now=0.0, wall=0.0)
    first = tracker.demand("t4")
    assert first is not None
    assert first.in_flight == 3.0 and first.stale  # no rate before the second scrape
    tracker.observe("r1", RouterMetrics({"t4": 130.0}, {"t4": 1.0}), now=15.0, wall=15.0)
    d = tracker.demand("t4")
    assert d is not None and not d.stale
    assert d.requests_per_second == pytest.approx(2.0) and d.in_flight == 1.0
    # the router restarted: its counter starts again from zero
    tracker.observe("r1", RouterMetrics({"t4": 45.0}, {}), now=30.0, wall=30.0)
    d = tracker.demand("t4")
    assert d is not None and d.requests_per_second == pytest.approx(3.0)
    assert tracker.demand("t256") == d.__class__(0.0, 0.0, False)  # an unseen tier: no demand


async def test_scrapes_sum_routers_and_keep_last_numbers_of_a_dead_one(
    router: tuple[str, FakeRouterMetrics],
) -> None:
    url, metrics = router
    dead = closed_port_url()
    clock = Clock()
    tracker = DemandTracker([url, dead], timeout_s=2.0, monotonic=clock, wall=clock)
    metrics.demand.labels(tier="t16").inc(10)
    metrics.inflight.labels(tier="t16").set(4)
    async with aiohttp.ClientSession() as session:
        await tracker.refresh(session)
        clock.t += 10
        metrics.demand.labels(tier="t16").inc(50)  # 5 req/s over the 10 s
        await tracker.refresh(session)
        d = tracker.demand("t16")
        assert d is not None
        assert d.requests_per_second == pytest.approx(5.0) and d.in_flight == 4.0
        assert d.stale  # one configured router never answered: demand may be higher
        (problem,) = tracker.problems()
        assert dead in problem and "never answered" in problem

        # refreshes younger than max_age_s reuse the last scrape (one scrape per pass)
        metrics.inflight.labels(tier="t16").set(9)
        await tracker.refresh(session, max_age_s=5.0)
        d2 = tracker.demand("t16")
        assert d2 is not None and d2.in_flight == 4.0


async def test_a_router_going_down_keeps_its_last_demand(
    router: tuple[str, FakeRouterMetrics], router_runner: list[web.AppRunner]
) -> None:
    url, metrics = router
    clock = Clock()
    tracker = DemandTracker([url], monotonic=clock, wall=clock)
    metrics.demand.labels(tier="t1").inc(1)
    metrics.inflight.labels(tier="t1").set(6)
    async with aiohttp.ClientSession() as session:
        await tracker.refresh(session)
        clock.t += 15
        metrics.demand.labels(tier="t1").inc(30)
        await tracker.refresh(session)
        before = tracker.demand("t1")
        assert before is not None and not before.stale
        assert before.requests_per_second == pytest.approx(2.0)

        await router_runner[0].cleanup()  # the router goes away
        clock.t += 15
        await tracker.refresh(session)
    after = tracker.demand("t1")
    assert after is not None and after.stale
    assert (after.requests_per_second, after.in_flight) == (before.requests_per_second, 6.0)
    (problem,) = tracker.problems()
    assert "unreachable" in problem and "using its last numbers" in problem


async def test_a_non_200_answer_counts_as_unreachable() -> None:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        tracker = DemandTracker([url])
        async with aiohttp.ClientSession() as session:
            await tracker.refresh(session)
        assert tracker.demand("t1") is None
        (problem,) = tracker.problems()
        assert "HTTP 503" in problem
    finally:
        await runner.cleanup()
