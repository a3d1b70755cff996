"""Plain records the store reads and writes (no SQLAlchemy types leak out of the store)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["ApiKeyInfo", "DecisionRecord", "FeedbackRecord", "TenantRecord"]


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One routing decision and how its request ended."""

    request_id: str
    tenant: str
    tier: str  # the tier that answered (or was chosen, if none answered)
    chosen_tier: str  # the tier the policy picked
    requested_model: str  # "auto" or the pinned tier
    policy: str
    reason: str
    propensity: float
    features: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)  # P(correct) per tier, if known
    outcome: str = "ok"  # ok | error | cancelled
    error: str | None = None
    latency_ms: float | None = None  # edge in -> last byte out
    pool_latency_ms: float | None = None
    cost: float | None = None  # the answering tier's cost weight (x attempts)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    edge: str = "http"
    created_at: datetime | None = None  # set by the store when None


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    request_id: str
    tenant: str
    score: float
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TenantRecord:
    name: str
    max_tokens_cap: int | None  # None: the global default cap applies
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What the store keeps about an API key that may be shown: never the key itself."""

    prefix: str  # the first 8 characters after ``fvl_``
    tenant: str
    created_at: datetime
    revoked: bool
