"""Per-tenant routing policies: what each tenant may use and how it trades quality for cost.

A :class:`TenantPolicy` comes from a RoutingPolicy object (Kubernetes) or from the
``tenant_policy`` settings (the default of every tenant no RoutingPolicy names). The request
path looks policies up in the immutable :class:`TenantPolicies` held by a
:class:`TenantPolicyHolder`; the watcher builds a new one and swaps it in with one reference
assignment, like the catalog.

Lookup order for a tenant, most specific first:

1. a RoutingPolicy whose ``spec.tenants`` names the tenant;
2. a RoutingPolicy whose ``spec.tenants`` holds ``"*"``;
3. the ``tenant_policy`` settings.

When several objects match at the same level, the one whose name sorts first wins (names
are unique in a namespace, so the choice is deterministic and the same on every router).

What the core enforces: ``allowed_tiers`` (see :func:`clamp_tier`); the quality floor on
fallback when the policy predicts P(correct) per tier (a fallback tier must meet the floor);
``allow_session_downgrade`` (off: the tier that answered a session's previous turn is a floor
for its next auto-routed turn); ``cascade`` (a low-confidence answer is asked again one tier
higher). λ (quality weight), the floor, the GPU-seconds budget and the exploration settings
go to the policy and are recorded in every decision (``features["tenant_policy"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from foveal.api.crds import CrdValidationError, RoutingPolicy
from foveal.config import TenantPolicySettings

__all__ = [
    "SETTINGS_SOURCE",
    "WILDCARD",
    "CascadePolicy",
    "Rejected",
    "TenantPolicies",
    "TenantPolicy",
    "TenantPolicyHolder",
    "clamp_tier",
    "policies_from_objects",
]

log = logging.getLogger(__name__)

WILDCARD = "*"
SETTINGS_SOURCE = "settings:tenant_policy"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A Kubernetes object left out of what the router uses, and why."""

    kind: str
    name: str
    resource_version: str | None
    error: str


@dataclass(frozen=True, slots=True)
class CascadePolicy:
    """Re-ask a low-confidence answer at a higher tier (see ``foveal.router.cascade``)."""

    threshold: float  # exp(mean token logprob) of the first answer below this escalates
    max_escalations: int = 1


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """The resolved policy of one tenant."""

    source: str  # "RoutingPolicy/<name>" or SETTINGS_SOURCE
    quality_weight: float = 0.0  # λ in P(correct) - λ·cost
    quality_floor: float = 0.0
    allowed_tiers: tuple[str, ...] = ()  # empty: every tier
    gpu_seconds_budget: tuple[float, str] | None = None  # (seconds, period)
    exploration: tuple[str, float] | None = None  # (algorithm, rate)
    allow_session_downgrade: bool = False
    cascade: CascadePolicy | None = None

    @classmethod
    def from_settings(cls, s: TenantPolicySettings) -> TenantPolicy:
        return cls(
            source=SETTINGS_SOURCE,
            quality_weight=s.quality_weight,
            quality_floor=s.quality_floor,
            allowed_tiers=tuple(s.allowed_tiers),
            gpu_seconds_budget=(
                (s.gpu_seconds_budget.seconds, s.gpu_seconds_budget.period)
                if s.gpu_seconds_budget
                else None
            ),
            exploration=((s.exploration.algorithm, s.exploration.rate) if s.exploration else None),
            allow_session_downgrade=s.allow_session_downgrade,
            cascade=(
                CascadePolicy(s.cascade.threshold, s.cascade.max_escalations) if s.cascade else None
            ),
        )

    @classmethod
    def from_resource(cls, rp: RoutingPolicy) -> TenantPolicy:
        spec = rp.spec
        return cls(
            source=f"RoutingPolicy/{rp.metadata.name}",
            quality_weight=spec.quality_weight,
            quality_floor=spec.quality_floor,
            allowed_tiers=tuple(spec.allowed_tiers),
            gpu_seconds_budget=(
                (spec.gpu_seconds_budget.seconds, spec.gpu_seconds_budget.period)
                if spec.gpu_seconds_budget
                else None
            ),
            exploration=(
                (spec.exploration.algorithm, spec.exploration.rate) if spec.exploration else None
            ),
            allow_session_downgrade=spec.allow_session_downgrade,
            cascade=(
                CascadePolicy(spec.cascade.threshold, spec.cascade.max_escalations)
                if spec.cascade
                else None
            ),
        )

    def allows(self, tier: str) -> bool:
        return not self.allowed_tiers or tier in self.allowed_tiers

    def summary(self) -> dict[str, Any]:
        """What a decision records (JSON-ready); the Explain API shows it."""
        budget = self.gpu_seconds_budget
        explore = self.exploration
        cascade = self.cascade
        return {
            "source": self.source,
            "quality_weight": self.quality_weight,
            "quality_floor": self.quality_floor,
            "allowed_tiers": list(self.allowed_tiers),
            "gpu_seconds_budget": ({"seconds": budget[0], "period": budget[1]} if budget else None),
            "exploration": {"algorithm": explore[0], "rate": explore[1]} if explore else None,
            "allow_session_downgrade": self.allow_session_downgrade,
            "cascade": (
                {"threshold": cascade.threshold, "max_escalations": cascade.max_escalations}
                if cascade
                else None
            ),
        }


@dataclass(frozen=True, slots=True)
class TenantPolicies:
    """Every tenant's policy, resolved up front so a lookup is one dict access."""

    default: TenantPolicy
    by_tenant: Mapping[str, TenantPolicy] = field(default_factory=dict)
    wildcard: TenantPolicy | None = None

    def lookup(self, tenant: str) -> TenantPolicy:
        found = self.by_tenant.get(tenant)
        if found is not None:
            return found
        return self.wildcard or self.default


class TenantPolicyHolder:
    """Holds the current :class:`TenantPolicies`; replacing it is one reference assignment."""

    def __init__(self, policies: TenantPolicies) -> None:
        self._policies = policies

    @property
    def snapshot(self) -> TenantPolicies:
        return self._policies

    def replace(self, policies: TenantPolicies) -> None:
        self._policies = policies


def policies_from_objects(
    objects: Iterable[Mapping[str, Any]], default: TenantPolicy
) -> tuple[TenantPolicies, list[Rejected]]:
    """RoutingPolicy objects (API server dicts) -> the tenants' policies, and what was rejected.

    A pure function: an invalid object is left out (and returned in the rejected list) while
    every valid one still applies; see the module docstring for the precedence rules.
    """
    parsed: list[RoutingPolicy] = []
    rejected: list[Rejected] = []
    for obj in objects:
        try:
            parsed.append(RoutingPolicy.from_object(obj))
        except CrdValidationError as exc:
            rejected.append(_rejected("RoutingPolicy", obj, str(exc)))
    by_tenant: dict[str, TenantPolicy] = {}
    wildcard: TenantPolicy | None = None
    for rp in sorted(parsed, key=lambda p: p.metadata.name):
        policy = TenantPolicy.from_resource(rp)
        for tenant in rp.spec.tenants:
            if tenant == WILDCARD:
                wildcard = wildcard or policy
            else:
                by_tenant.setdefault(tenant, policy)
    return TenantPolicies(default=default, by_tenant=by_tenant, wildcard=wildcard), rejected


def clamp_tier(tier: str, names: Sequence[str], policy: TenantPolicy) -> str | None:
    """The tier to use instead of ``tier`` under ``policy``; ``None`` when no allowed tier is in
    the catalog.

    ``names`` is the catalog order (cheapest first). A tier outside the allowed set moves to the
    nearest allowed tier above it (quality first), else to the nearest one below it.
    """
    if policy.allows(tier):
        return tier
    i = names.index(tier) if tier in names else len(names)
    for name in names[i + 1 :]:
        if policy.allows(name):
            return name
    for name in reversed(names[:i]):
        if policy.allows(name):
            return name
    return None


def _rejected(kind: str, obj: Mapping[str, Any], error: str) -> Rejected:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    rv = meta.get("resourceVersion")
    return Rejected(kind, str(meta.get("name") or "<unnamed>"), rv if rv else None, error)
