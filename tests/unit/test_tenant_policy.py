"""Tenant policies: RoutingPolicy objects -> lookups, allowed-tier clamping, and enforcement
through the real gateway (HTTP 403 for a pin outside the allowed tiers)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from foveal.config import Settings, TenantPolicySettings
from foveal.router.tenant_policy import (
    SETTINGS_SOURCE,
    TenantPolicies,
    TenantPolicy,
    TenantPolicyHolder,
    clamp_tier,
    policies_from_objects,
)
from foveal.testing.images import image_message
from foveal.testing.stack import running_stack

NAMES = ["t1", "t4", "t16", "t64", "t256"]
DEFAULT = TenantPolicy.from_settings(TenantPolicySettings(quality_weight=0.5))


def rp(name: str, tenants: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "foveal.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": name, "namespace": "prod", "resourceVersion": "7"},
        "spec": {"tenants": tenants, **spec},
    }


def test_exact_tenant_beats_wildcard_which_beats_the_settings_default() -> None:
    policies, rejected = policies_from_objects(
        [rp("everyone", ["*"], qualityWeight=1.0), rp("acme", ["acme"], qualityWeight=2.0)],
        DEFAULT,
    )
    assert rejected == []
    assert policies.lookup("acme").source == "RoutingPolicy/acme"
    assert policies.lookup("acme").quality_weight == 2.0
    assert policies.lookup("other").source == "RoutingPolicy/everyone"
    only_named, _ = policies_from_objects([rp("acme", ["acme"])], DEFAULT)
    assert only_named.lookup("other") is DEFAULT
    assert DEFAULT.source == SETTINGS_SOURCE and DEFAULT.quality_weight == 0.5


def test_ties_go_to_the_object_whose_name_sorts_first() -> None:
    objs = [
        rp("b-policy", ["acme", "*"], qualityWeight=2.0),
        rp("a-policy", ["acme", "*"], qualityWeight=1.0),
    ]
    for order in (objs, list(reversed(objs))):
        policies, _ = policies_from_objects(order, DEFAULT)
        assert policies.lookup("acme").source == "RoutingPolicy/a-policy"
        assert policies.lookup("zed").source == "RoutingPolicy/a-policy"


def test_an_invalid_object_is_left_out_and_named_while_the_others_apply() -> None:
    objs = [
        rp("bad-floor", ["acme"], qualityFloor=1.5),
        rp("no-tenants", []),
        rp("good", ["acme"], allowedTiers=["t4"]),
        {"metadata": {"name": "no-spec"}},
    ]
    policies, rejected = policies_from_objects(objs, DEFAULT)
    assert policies.lookup("acme").source == "RoutingPolicy/good"
    by_name = {r.name: r for r in rejected}
    assert set(by_name) == {"bad-floor", "no-tenants", "no-spec"}
    assert "spec.qualityFloor" in by_name["bad-floor"].error
    assert "spec.tenants" in by_name["no-tenants"].error
    assert by_name["bad-floor"].kind == "RoutingPolicy"
    assert by_name["bad-floor"].resource_version == "7"


def test_a_policy_records_every_knob() -> None:
    policies, _ = policies_from_objects(
        [
            rp(
                "p",
                ["acme"],
                qualityWeight=0.3,
                qualityFloor=0.8,
                allowedTiers=["t16", "t64"],
                gpuSecondsBudget={"seconds": 3600, "period": "day"},
                exploration={"algorithm": "thompson", "rate": 0.1},
                allowSessionDowngrade=True,
                cascade={"threshold": 0.4},
            )
        ],
        DEFAULT,
    )
    assert policies.lookup("acme").summary() == {
        "source": "RoutingPolicy/p",
        "quality_weight": 0.3,
        "quality_floor": 0.8,
        "allowed_tiers": ["t16", "t64"],
        "gpu_seconds_budget": {"seconds": 3600.0, "period": "day"},
        "exploration": {"algorithm": "thompson", "rate": 0.1},
        "allow_session_downgrade": True,
        "cascade": {"threshold": 0.4, "max_escalations": 1},
    }
    # the settings default: no downgrade of sessions, no cascade
    assert DEFAULT.allow_session_downgrade is False and DEFAULT.cascade is None
    configured = TenantPolicy.from_settings(
        TenantPolicySettings(cascade={"threshold": 0.5, "max_escalations": 2})
    )
    assert configured.summary()["cascade"] == {"threshold": 0.5, "max_escalations": 2}


def test_cascade_and_downgrade_knobs_are_validated() -> None:
    bad = [
        rp("no-threshold", ["a"], cascade={}),
        rp("high", ["b"], cascade={"threshold": 1.5}),
        rp("many", ["c"], cascade={"threshold": 0.5, "maxEscalations": 9}),
        rp("flag", ["d"], allowSessionDowngrade="sometimes"),
    ]
    policies, rejected = policies_from_objects(bad, DEFAULT)
    errors = {r.name: r.error for r in rejected}
    assert set(errors) == {"no-threshold", "high", "many", "flag"}
    assert "spec.cascade.threshold" in errors["no-threshold"]
    assert "spec.cascade.threshold" in errors["high"]
    assert "spec.cascade.maxEscalations" in errors["many"]
    assert "spec.allowSessionDowngrade" in errors["flag"]
    assert policies.lookup("a") is DEFAULT
    with pytest.raises(ValidationError, match="cascade.threshold"):
        TenantPolicySettings(cascade={"threshold": -0.1})


@pytest.mark.parametrize(
    ("chosen", "allowed", "expected"),
    [
        ("t16", [], "t16"),  # empty = every tier
        ("t16", ["t16"], "t16"),
        ("t1", ["t16", "t64"], "t16"),  # upward first: nearest above
        ("t256", ["t4", "t16"], "t16"),  # none above: nearest below
        ("t16", ["t4", "t256"], "t256"),  # above wins over a nearer tier below
        ("t16", ["t32"], None),  # nothing allowed is in the catalog
    ],
)
def test_clamp_moves_to_the_nearest_allowed_tier_upward_first(
    chosen: str, allowed: list[str], expected: str | None
) -> None:
    policy = TenantPolicy(source="test", allowed_tiers=tuple(allowed))
    assert clamp_tier(chosen, NAMES, policy) == expected


def test_the_holder_swaps_the_whole_set() -> None:
    holder = TenantPolicyHolder(TenantPolicies(default=DEFAULT))
    before = holder.snapshot
    new, _ = policies_from_objects([rp("p", ["acme"], qualityWeight=9.0)], DEFAULT)
    holder.replace(new)
    assert holder.snapshot.lookup("acme").quality_weight == 9.0
    assert before.lookup("acme") is DEFAULT  # readers of the old snapshot are unaffected


def test_settings_refuse_unknown_allowed_tiers_with_the_static_catalog() -> None:
    with pytest.raises(ValidationError, match="tenant_policy.allowed_tiers"):
        Settings(tenant_policy={"allowed_tiers": ["t999"]})
    # with ModelPools as the source the tiers are not known up front
    Settings(catalog={"source": "kubernetes"}, tenant_policy={"allowed_tiers": ["t999"]})


# -- through the real gateway ---------------------------------------------------------------


async def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json(), r.headers


async def test_pin_outside_the_allowed_tiers_is_403_naming_them() -> None:
    async with running_stack(tenant_policy={"allowed_tiers": ["t4", "t16"]}) as stack:
        status, body, _ = await _post(
            stack.http_url, {"model": "t256", "messages": [image_message("Read the sign")]}
        )
        assert status == 403
        assert body["error"]["type"] == "permission_error"
        assert body["error"]["code"] == "tier_not_allowed"
        assert "t4, t16" in body["error"]["message"] and "t256" in body["error"]["message"]
        assert not stack.pool("t256").pool.requests
        # an allowed pin goes through
        status, _, headers = await _post(
            stack.http_url, {"model": "t4", "messages": [image_message("Read the sign")]}
        )
        assert status == 200 and headers["x-foveal-tier"] == "t4"


async def test_auto_routing_is_clamped_and_the_policy_shows_in_explain() -> None:
    policy = {"allowed_tiers": ["t4", "t16"], "quality_weight": 0.25, "quality_floor": 0.6}
    async with running_stack(tenant_policy=policy) as stack:
        # a reading prompt picks the top tier; the nearest allowed one is below it
        status, _, headers = await _post(
            stack.http_url, {"model": "auto", "messages": [image_message("Read the sign")]}
        )
        assert status == 200 and headers["x-foveal-tier"] == "t16"
        # a text-only prompt picks the lowest tier; the nearest allowed one is above it
        status, _, headers = await _post(
            stack.http_url, {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 200 and headers["x-foveal-tier"] == "t4"
        rid = headers["x-foveal-request-id"]
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{stack.http_url}/v1/decisions/{rid}") as r,
        ):
            record = await r.json()
        assert record["chosen_tier"] == "t4"
        assert "t1 not allowed" in record["reason"]
        tp = record["features"]["tenant_policy"]
        assert tp["quality_weight"] == 0.25 and tp["quality_floor"] == 0.6
        assert tp["allowed_tiers"] == ["t4", "t16"] and tp["source"] == SETTINGS_SOURCE


async def test_swapped_policies_apply_per_tenant_and_fallback_stays_allowed() -> None:
    async with running_stack() as stack:
        policies, _ = policies_from_objects(
            [rp("default-tenant", ["default"], allowedTiers=["t16", "t64"])],
            stack.core.tenant_policies.snapshot.default,
        )
        stack.core.tenant_policies.replace(policies)
        stack.pool("t64").pool.script.fail_status = 500  # the chosen tier fails
        status, _, headers = await _post(
            stack.http_url, {"model": "auto", "messages": [image_message("Read the sign")]}
        )
        # reading -> t256, clamped to t64, which fails: fallback goes to t16, never t256
        assert status == 200 and headers["x-foveal-tier"] == "t16"
        assert stack.pool("t64").pool.requests and not stack.pool("t256").pool.requests
