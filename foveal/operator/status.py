"""Pure status logic: conditions, the ModelPool status from its Deployment, policy verdicts.

Conditions follow the Kubernetes convention: one entry per type, ``lastTransitionTime`` changes
only when ``status`` changes (a new message alone keeps the time), ``observedGeneration`` says
which spec the condition describes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from foveal.api.crds import (
    API_VERSION,
    CONDITION_ACCEPTED,
    CONDITION_DEGRADED,
    CONDITION_READY,
    CONDITION_SCALING,
    RoutingPolicySpec,
)

__all__ = [
    "ConditionUpdate",
    "PolicyInput",
    "PolicyVerdict",
    "accepted_condition",
    "degraded_condition",
    "deployment_counts",
    "evaluate_policies",
    "merge_conditions",
    "pool_event",
    "ready_condition",
    "rfc3339",
]


def rfc3339(wall: float) -> str:
    """Kubernetes time format (UTC, seconds): ``2026-11-21T10:00:00Z``."""
    return dt.datetime.fromtimestamp(int(wall), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ConditionUpdate:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


def merge_conditions(
    current: Sequence[Mapping[str, Any]],
    updates: Sequence[ConditionUpdate],
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """``current`` with ``updates`` applied; other condition types are kept as they are."""
    out = [dict(c) for c in current if isinstance(c, Mapping) and c.get("type")]
    for upd in updates:
        old = next((c for c in out if c["type"] == upd.type), None)
        new: dict[str, Any] = {
            "type": upd.type,
            "status": upd.status,
            "reason": upd.reason,
            # Kubernetes 1.20 turns an empty string in a map-keyed list item into null (and
            # then rejects it): leave an empty message out.
            **({"message": upd.message} if upd.message else {}),
            "lastTransitionTime": (
                old.get("lastTransitionTime") or now
                if old is not None and old.get("status") == upd.status
                else now
            ),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        if old is None:
            out.append(new)
        else:
            out[out.index(old)] = new
    return out


def deployment_counts(deployment: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """(wanted, replicas, readyReplicas) of a Deployment; zeros when it does not exist."""
    if not deployment:
        return 0, 0, 0
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    return (
        int(spec.get("replicas") or 0),
        int(status.get("replicas") or 0),
        int(status.get("readyReplicas") or 0),
    )


def ready_condition(wanted: int, ready: int) -> ConditionUpdate:
    """Ready = at least one replica serves; a pool scaled to zero is a cold tier, not broken."""
    if ready > 0:
        return ConditionUpdate(
            CONDITION_READY, "True", "Serving", f"{ready}/{wanted} replicas ready"
        )
    if wanted == 0:
        return ConditionUpdate(
            CONDITION_READY,
            "False",
            "ScaledToZero",
            "no replicas (cold tier): routers fall back to a warm tier until demand wakes it",
        )
    return ConditionUpdate(
        CONDITION_READY, "False", "NoReadyReplicas", f"0/{wanted} replicas ready"
    )


def degraded_condition(problems: Mapping[str, Sequence[str]]) -> ConditionUpdate:
    """``problems``: reason (``InvalidSpec``, ``ApplyFailed``) -> messages; none = healthy."""
    found = {reason: list(msgs) for reason, msgs in problems.items() if msgs}
    if not found:
        return ConditionUpdate(CONDITION_DEGRADED, "False", "AsExpected", "no problems")
    reason = next(iter(found))
    message = "; ".join(m for msgs in found.values() for m in msgs)
    return ConditionUpdate(CONDITION_DEGRADED, "True", reason, message)


def scaling_condition(code: str, message: str, *, changing: bool) -> ConditionUpdate:
    return ConditionUpdate(CONDITION_SCALING, "True" if changing else "False", code, message)


def pool_event(
    meta: Mapping[str, Any],
    *,
    reason: str,
    message: str,
    now: str,
    component: str,
    type: str = "Normal",
) -> dict[str, Any]:
    """A core/v1 Event about the ModelPool with metadata ``meta`` (``kubectl describe``).

    ``generateName`` gives each Event a unique name, as the Kubernetes controllers' own
    ``<object>.<suffix>`` names; the message is capped at the API server's 1 KiB limit.
    """
    namespace = meta["namespace"]
    involved = {
        "apiVersion": API_VERSION,
        "kind": "ModelPool",
        "name": meta["name"],
        "namespace": namespace,
        **({"uid": meta["uid"]} if meta.get("uid") else {}),
        **({"resourceVersion": meta["resourceVersion"]} if meta.get("resourceVersion") else {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
        "involvedObject": involved,
        "type": type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


# --------------------------------------------------------------------------- RoutingPolicy


@dataclass(frozen=True, slots=True)
class PolicyInput:
    name: str
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text)
    spec: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    accepted: bool
    reason: str
    message: str


def _own_problems(spec: RoutingPolicySpec) -> list[str]:
    found = []
    tenants = spec.tenants
    dupes = sorted({t for t in tenants if tenants.count(t) > 1})
    if dupes:
        found.append(f"spec.tenants lists {', '.join(map(repr, dupes))} more than once")
    if "*" in tenants and len(tenants) > 1:
        found.append('spec.tenants: "*" (every other tenant) must be the only entry')
    if spec.exploration is not None and spec.exploration.algorithm == "none":
        if spec.exploration.rate > 0:
            found.append(
                "spec.exploration.rate is "
                f"{spec.exploration.rate:g} but spec.exploration.algorithm is 'none'"
            )
    return found


def evaluate_policies(policies: Sequence[PolicyInput]) -> dict[str, PolicyVerdict]:
    """Verdicts for every RoutingPolicy of one namespace.

    A policy is accepted when its spec is valid and none of its tenants is already governed
    by an older accepted policy (creation time, then name): a tenant must resolve to exactly
    one policy, and the router only uses accepted ones.
    """
    verdicts: dict[str, PolicyVerdict] = {}
    owner: dict[str, str] = {}
    for p in sorted(policies, key=lambda p: (p.created, p.name)):
        try:
            spec = RoutingPolicySpec.model_validate(p.spec)
        except ValidationError as exc:
            problems = [
                f"spec.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
            ]
            verdicts[p.name] = PolicyVerdict(False, "InvalidSpec", "; ".join(problems))
            continue
        problems = _own_problems(spec)
        if problems:
            verdicts[p.name] = PolicyVerdict(False, "InvalidSpec", "; ".join(problems))
            continue
        taken = [f"{t!r} by {owner[t]!r}" for t in spec.tenants if t in owner]
        if taken:
            verdicts[p.name] = PolicyVerdict(
                False,
                "TenantConflict",
                "tenants already governed by an older RoutingPolicy: " + ", ".join(taken),
            )
            continue
        for t in spec.tenants:
            owner[t] = p.name
        who = (
            "every tenant without a more specific policy"
            if spec.tenants == ["*"]
            else ("tenants " + ", ".join(spec.tenants))
        )
        verdicts[p.name] = PolicyVerdict(True, "Accepted", f"applies to {who}")
    return verdicts


def accepted_condition(verdict: PolicyVerdict) -> ConditionUpdate:
    return ConditionUpdate(
        CONDITION_ACCEPTED, "True" if verdict.accepted else "False", verdict.reason,
        verdict.message,
    )  # fmt: skip
