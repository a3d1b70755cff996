"""Status logic: condition transitions, Ready/Degraded, and RoutingPolicy verdicts."""

from __future__ import annotations

from typing import Any

from foveal.operator import status as st
from foveal.operator.status import ConditionUpdate, PolicyInput, evaluate_policies


def test_rfc3339() -> None:
    assert st.rfc3339(0) == "1970-01-01T00:00:00Z"
    assert st.rfc3339(1_800_000_000.7) == "2027-01-15T08:00:00Z"


def test_transition_time_changes_only_with_the_status() -> None:
    first = st.merge_conditions(
        [], [ConditionUpdate("Ready", "False", "NoReadyReplicas", "0/2")], now="T1", generation=1
    )
    assert first == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "NoReadyReplicas",
            "message": "0/2",
            "lastTransitionTime": "T1",
            "observedGeneration": 1,
        }
    ]
    same = st.merge_conditions(
        first, [ConditionUpdate("Ready", "False", "NoReadyReplicas", "0/3")], now="T2", generation=2
    )
    assert same[0]["lastTransitionTime"] == "T1"  # new message, same status
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("0/3", 2)
    flipped = st.merge_conditions(
        same, [ConditionUpdate("Ready", "True", "Serving", "1/3")], now="T3", generation=2
    )
    assert flipped[0]["lastTransitionTime"] == "T3"


def test_other_condition_types_are_kept_in_place() -> None:
    current: list[dict[str, Any]] = [
        {"type": "Ready", "status": "True", "lastTransitionTime": "T0"},
        {"type": "Scaling", "status": "False", "lastTransitionTime": "T0"},
    ]
    out = st.merge_conditions(
        current, [ConditionUpdate("Degraded", "False", "AsExpected", "")], now="T1", generation=None
    )
    assert [c["type"] for c in out] == ["Ready", "Scaling", "Degraded"]
    assert out[:2] == current and "observedGeneration" not in out[2]


def test_ready_condition() -> None:
    assert st.ready_condition(3, 2) == ConditionUpdate(
        "Ready", "True", "Serving", "2/3 replicas ready"
    )
    cold = st.ready_condition(0, 0)
    assert (cold.status, cold.reason) == ("False", "ScaledToZero")
    starting = st.ready_condition(2, 0)
    assert (starting.status, starting.reason, starting.message) == (
        "False",
        "NoReadyReplicas",
        "0/2 replicas ready",
    )


def test_degraded_condition() -> None:
    assert st.degraded_condition({}).status == "False"
    assert st.degraded_condition({"InvalidSpec": []}).status == "False"
    bad = st.degraded_condition({"InvalidSpec": ["spec.maxReplicas (1) must be >= ..."]})
    assert (bad.status, bad.reason) == ("True", "InvalidSpec")
    assert "spec.maxReplicas" in bad.message


def test_deployment_counts() -> None:
    assert st.deployment_counts(None) == (0, 0, 0)
    dep = {"spec": {"replicas": 3}, "status": {"replicas": 3, "readyReplicas": 1}}
    assert st.deployment_counts(dep) == (3, 3, 1)
    assert st.deployment_counts({"spec": {"replicas": 2}, "status": {}}) == (2, 0, 0)


def policy(name: str, created: str, **spec: Any) -> PolicyInput:
    return PolicyInput(name=name, created=created, spec=spec)


def test_valid_policies_are_accepted() -> None:
    verdicts = evaluate_policies(
        [
            policy("default", "2026-01-01T00:00:00Z", tenants=["*"], qualityWeight=0.2),
            policy("gold", "2026-01-02T00:00:00Z", tenants=["acme", "globex"], qualityFloor=0.9),
        ]
    )
    assert verdicts["default"].accepted and verdicts["gold"].accepted
    assert verdicts["default"].message == "applies to every tenant without a more specific policy"
    assert verdicts["gold"].message == "applies to tenants acme, globex"


def test_invalid_policies_are_rejected_with_the_field() -> None:
    verdicts = evaluate_policies(
        [
            policy("floor", "1", tenants=["a"], qualityFloor=2),
            policy("dupe", "2", tenants=["b", "b"]),
            policy("star", "3", tenants=["*", "c"]),
            policy("explore", "4", tenants=["d"], exploration={"algorithm": "none", "rate": 0.2}),
        ]
    )
    assert not any(v.accepted for v in verdicts.values())
    assert {v.reason for v in verdicts.values()} == {"InvalidSpec"}
    assert "spec.qualityFloor" in verdicts["floor"].message
    assert "'b' more than once" in verdicts["dupe"].message
    assert '"*"' in verdicts["star"].message
    assert "spec.exploration.rate" in verdicts["explore"].message


def test_a_tenant_resolves_to_the_oldest_policy() -> None:
    policies = [
        policy("newer", "2026-01-03T00:00:00Z", tenants=["acme", "initech"]),
        policy("older", "2026-01-01T00:00:00Z", tenants=["acme"]),
        policy("other", "2026-01-02T00:00:00Z", tenants=["globex"]),
    ]
    verdicts = evaluate_policies(policies)
    assert verdicts["older"].accepted and verdicts["other"].accepted
    assert not verdicts["newer"].accepted
    assert verdicts["newer"].reason == "TenantConflict"
    assert "'acme' by 'older'" in verdicts["newer"].message
    # once the older policy is deleted, the newer one takes over
    assert evaluate_policies([policies[0], policies[2]])["newer"].accepted
    # an invalid older policy claims nothing
    broken = policy("older", "2026-01-01T00:00:00Z", tenants=["acme"], qualityWeight=-1)
    assert evaluate_policies([policies[0], broken])["newer"].accepted


def test_accepted_condition() -> None:
    (verdict,) = evaluate_policies([policy("p", "1", tenants=["*"])]).values()
    cond = st.accepted_condition(verdict)
    assert (cond.type, cond.status, cond.reason) == ("Accepted", "True", "Accepted")
