"""Every Prometheus metric Foveal exports, named ``foveal_<subsystem>_<name>_<unit>``.

Labels stay small and bounded (tier, edge, outcome, kind): never request ids or tenants.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

__all__ = [
    "CASCADE_TOTAL",
    "CONTENT_TYPE_LATEST",
    "DECISION_SECONDS",
    "FEEDBACK_TOTAL",
    "GATEWAY_OVERHEAD_SECONDS",
    "POOL_ENDPOINTS_AVAILABLE",
    "POOL_ERRORS_TOTAL",
    "POOL_FALLBACKS_TOTAL",
    "POOL_REQUEST_SECONDS",
    "REQUESTS_INFLIGHT",
    "REQUESTS_TOTAL",
    "REQUEST_SECONDS",
    "STORE_DECISIONS_PENDING",
    "STORE_DECISIONS_WRITTEN_TOTAL",
    "STORE_WRITE_ERRORS_TOTAL",
    "TIER_DEMAND_TOTAL",
    "exposition",
]

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS_TOTAL = Counter(
    "foveal_router_requests_total",
    "Chat requests by edge, answering tier and outcome.",
    ["edge", "tier", "outcome"],
)
REQUESTS_INFLIGHT = Gauge(
    "foveal_router_requests_inflight",
    "Chat requests in flight, by the tier they were routed to.",
    ["tier"],
)
REQUEST_SECONDS = Histogram(
    "foveal_router_request_duration_seconds",
    "Time from a request's arrival to its last byte, by answering tier.",
    ["tier"],
    buckets=_SLOW,
)
DECISION_SECONDS = Histogram(
    "foveal_router_decision_duration_seconds",
    "Time the policy took to pick a tier.",
    buckets=_FAST,
)
TIER_DEMAND_TOTAL = Counter(
    "foveal_router_tier_demand_total",
    "Requests whose policy chose this tier, counted before any fallback: the demand the "
    "operator scales from (a cold tier at zero replicas shows it too).",
    ["tier"],
)
GATEWAY_OVERHEAD_SECONDS = Histogram(
    "foveal_gateway_overhead_seconds",
    "Time a request spent in Foveal itself: total time minus time waiting on the pool.",
    ["edge"],
    buckets=_FAST,
)
POOL_REQUEST_SECONDS = Histogram(
    "foveal_pool_request_duration_seconds",
    "Latency of one attempt at a pool endpoint, by tier.",
    ["tier"],
    buckets=_SLOW,
)
POOL_ERRORS_TOTAL = Counter(
    "foveal_pool_errors_total",
    "Failed attempts at pool endpoints, by tier and kind (connect, timeout, status, protocol).",
    ["tier", "kind"],
)
POOL_FALLBACKS_TOTAL = Counter(
    "foveal_pool_fallbacks_total",
    "Requests answered by another tier than the one chosen, by chosen tier.",
    ["tier"],
)
POOL_ENDPOINTS_AVAILABLE = Gauge(
    "foveal_pool_endpoints_available",
    "Endpoints per tier that are healthy and whose circuit breaker is closed.",
    ["tier"],
)
CASCADE_TOTAL = Counter(
    "foveal_router_cascade_total",
    "Cascaded requests by first answering tier and result (kept: confident enough or no "
    "higher tier; escalated: asked again higher up; failed: no higher tier could answer).",
    ["tier", "result"],
)
FEEDBACK_TOTAL = Counter(
    "foveal_router_feedback_total",
    "Feedback calls by outcome (accepted, invalid_token, reused, error).",
    ["outcome"],
)
STORE_DECISIONS_PENDING = Gauge(
    "foveal_store_decisions_pending",
    "Decisions accepted but not yet committed to the store (lost if the process crashes).",
)
STORE_DECISIONS_WRITTEN_TOTAL = Counter(
    "foveal_store_decisions_written_total",
    "Decisions committed to the store.",
)
STORE_WRITE_ERRORS_TOTAL = Counter(
    "foveal_store_write_errors_total",
    "Failed batch writes of decisions (each retried until shutdown).",
)


def exposition() -> bytes:
    """The text exposition of the default registry."""
    return generate_latest()
