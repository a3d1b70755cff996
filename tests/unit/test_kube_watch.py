"""ModelPool objects -> the router's catalog, the watcher's event bookkeeping and lifecycle, and
what a swapped catalog (cold tiers, new and removed endpoints) does through the real gateway.

The watcher against a real kube-apiserver is covered by the end-to-end tests.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foveal.config import CatalogSettings
from foveal.pools.catalog import CatalogHolder
from foveal.router.kube_watch import (
    KubeConfigError,
    KubeWatcher,
    ObjectCache,
    catalog_from_pools,
)
from foveal.router.tenant_policy import (
    SETTINGS_SOURCE,
    TenantPolicies,
    TenantPolicy,
    TenantPolicyHolder,
)
from foveal.testing.images import image_message
from foveal.testing.stack import LocalStack, running_stack


def mp(
    name: str,
    tier: str,
    tokens: int,
    *,
    ready: int = 1,
    endpoints: list[str] | None = None,
    rv: str = "1",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "foveal.io/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": name, "namespace": "prod", "resourceVersion": rv},
        "spec": {
            "tier": tier,
            "visualTokens": tokens,
            "backend": "reference",
            "image": "foveal:dev",
            **spec,
        },
        "status": {
            "readyReplicas": ready,
            "endpoints": [f"http://foveal-pool-{name}.prod.svc:8000"]
            if endpoints is None
            else endpoints,
        },
    }


# -- ModelPools -> Catalog ------------------------------------------------------------------


def test_tiers_are_ordered_by_visual_tokens_with_their_endpoints() -> None:
    catalog, rejected = catalog_from_pools(
        [
            mp("big", "t256", 256, model="qwen", endpoints=["http://a:8000/", "http://b:8000"]),
            mp("small", "t1", 1),
            mp("mid", "t16", 16),
        ]
    )
    assert rejected == []
    assert catalog.names == ["t1", "t16", "t256"]
    big = catalog.get("t256")
    assert big is not None
    assert [e.url for e in big.endpoints] == ["http://a:8000", "http://b:8000"]
    assert {e.model for e in big.endpoints} == {"qwen"} and big.model == "qwen"
    assert big.visual_tokens == 256 and big.cost_weight == 256.0 and big.backend == "reference"


def test_a_tier_without_ready_replicas_stays_cold_with_no_endpoints() -> None:
    catalog, rejected = catalog_from_pools(
        [mp("warm", "t4", 4), mp("cold", "t64", 64, ready=0, minReplicas=0)]
    )
    assert rejected == []
    assert catalog.names == ["t4", "t64"]
    cold = catalog.get("t64")
    assert cold is not None and cold.endpoints == ()  # stale status.endpoints are not used


def test_invalid_objects_are_left_out_by_name_and_the_rest_stays() -> None:
    catalog, rejected = catalog_from_pools(
        [
            mp("good", "t4", 4),
            mp("zero-tokens", "t8", 0),
            mp("bad-tier", "T_16", 16),
            mp("reserved", "auto", 2),
            mp("bad-url", "t64", 64, endpoints=["ftp://x:21", "http://ok:8000", "http://ok:8000"]),
            {"metadata": {"name": "no-spec"}},
            mp("zz-dup", "t4", 4),
        ]
    )
    assert catalog.names == ["t4", "t64"]
    t4, t64 = catalog.get("t4"), catalog.get("t64")
    assert t4 is not None and t4.endpoints[0].url == "http://foveal-pool-good.prod.svc:8000"
    assert t64 is not None and [e.url for e in t64.endpoints] == ["http://ok:8000"]
    errors = {r.name: r.error for r in rejected}
    assert set(errors) == {"zero-tokens", "bad-tier", "reserved", "bad-url", "no-spec", "zz-dup"}
    assert "spec.visualTokens" in errors["zero-tokens"]
    assert "spec.tier" in errors["bad-tier"]
    assert "reserved" in errors["reserved"]
    assert "ftp://x:21" in errors["bad-url"]
    assert "spec" in errors["no-spec"]
    assert "already served by ModelPool good" in errors["zz-dup"]


def test_no_pools_give_an_empty_catalog() -> None:
    catalog, rejected = catalog_from_pools([])
    assert catalog.tiers == () and rejected == []


# -- event bookkeeping ----------------------------------------------------------------------


def test_the_cache_follows_list_and_watch_events() -> None:
    cache = ObjectCache()
    cache.reset({"metadata": {"resourceVersion": "10"}, "items": [mp("a", "t1", 1, rv="9")]})
    assert set(cache.objects) == {"a"} and cache.resource_version == "10"
    assert cache.apply({"type": "ADDED", "raw_object": mp("b", "t4", 4, rv="11")})
    assert cache.apply({"type": "MODIFIED", "raw_object": mp("a", "t1", 1, ready=0, rv="12")})
    assert cache.objects["a"]["status"]["readyReplicas"] == 0
    assert cache.resource_version == "12"
    bookmark = {"type": "BOOKMARK", "raw_object": {"metadata": {"resourceVersion": "15"}}}
    assert not cache.apply(bookmark)
    assert cache.resource_version == "15"
    assert cache.apply({"type": "DELETED", "raw_object": mp("b", "t4", 4, rv="16")})
    assert set(cache.objects) == {"a"} and cache.resource_version == "16"
    cache.reset({"metadata": {"resourceVersion": "20"}, "items": []})  # a relist drops all
    assert cache.objects == {} and cache.resource_version == "20"


def _watcher(settings: CatalogSettings) -> tuple[KubeWatcher, CatalogHolder, TenantPolicyHolder]:
    default = TenantPolicy(source=SETTINGS_SOURCE)
    catalog = CatalogHolder(catalog_from_pools([])[0])
    policies = TenantPolicyHolder(TenantPolicies(default=default))
    return KubeWatcher(settings, catalog, policies, default), catalog, policies


def test_rebuilds_swap_the_holders_and_warn_once_per_bad_object(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher, catalog, policies = _watcher(CatalogSettings(source="kubernetes"))
    bad = mp("bad", "t8", 0)
    with caplog.at_level(logging.WARNING, logger="foveal.router.kube_watch"):
        watcher._on_pools([mp("a", "t1", 1), bad])
        watcher._on_pools([mp("a", "t1", 1), bad, mp("b", "t4", 4)])
    assert catalog.snapshot.names == ["t1", "t4"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ModelPool bad" in warnings[0]
    assert "spec.visualTokens" in warnings[0]
    rp = {"metadata": {"name": "p"}, "spec": {"tenants": ["acme"], "qualityWeight": 3}}
    watcher._on_policies([rp])
    assert policies.snapshot.lookup("acme").quality_weight == 3


def test_a_missing_kubeconfig_is_a_clear_start_up_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    watcher, _, _ = _watcher(CatalogSettings(source="kubernetes", kubeconfig=str(missing)))
    with pytest.raises(KubeConfigError, match="no usable Kubernetes configuration"):
        watcher.start()
    watcher.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kubeconfig(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}
users:
- name: me
  user: {{token: not-a-real-token}}
contexts:
- name: local
  context: {{cluster: local, user: me, namespace: team-a}}
current-context: local
"""
    )
    return path


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("foveal-watch-")]


async def test_a_router_on_an_unreachable_api_server_serves_503_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """The watch retries in the background; requests get a clear 503 meanwhile."""
    kubeconfig = _kubeconfig(tmp_path, _closed_port())
    catalog = {
        "source": "kubernetes",
        "kubeconfig": str(kubeconfig),
        "initial_sync_timeout_s": 0.2,
        "backoff_max_s": 0.2,
    }
    async with running_stack(catalog=catalog) as stack:
        watcher = stack.router._watcher if stack.router else None
        assert watcher is not None and watcher.namespace == "team-a"  # from the context
        assert len(watcher.threads) == 2 and all(t.is_alive() for t in watcher.threads)
        assert stack.core.catalog.snapshot.tiers == ()  # the static tiers are not used
        status, body, headers = await _post(stack.http_url, "auto", "Read the sign")
        assert status == 503 and "catalog is empty" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        async with aiohttp.ClientSession() as s, s.get(f"{stack.http_url}/readyz") as r:
            assert r.status == 503
        threads = watcher.threads
    assert not any(t.is_alive() for t in threads)
    assert _watch_threads() == []


# -- a swapped catalog through the real gateway ---------------------------------------------


async def _post(url: str, model: str, text: str) -> tuple[int, dict[str, Any], Any]:
    body = {"model": model, "messages": [image_message(text)]}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json(), r.headers


def _swap(stack: LocalStack, cold: set[str], drop: frozenset[str] = frozenset()) -> None:
    """Replace the stack's catalog with one built from ModelPools naming its fake pools."""
    objs = [
        mp(
            f"pool-{t.name}",
            t.name,
            t.visual_tokens,
            ready=0 if t.name in cold else 1,
            endpoints=[e.url for e in t.endpoints],
        )
        for t in stack.core.catalog.snapshot.tiers
        if t.name not in drop
    ]
    catalog, rejected = catalog_from_pools(objs)
    assert rejected == []
    stack.core.catalog.replace(catalog)


def _demand(text: str, tier: str) -> float:
    prefix = f'foveal_router_tier_demand_total{{tier="{tier}"}} '
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        return await r.text()


async def test_a_cold_tier_503s_when_pinned_and_auto_falls_back_to_the_nearest_warm(
    stack: LocalStack,
) -> None:
    _swap(stack, cold={"t256", "t64"})
    before = _demand(await _metrics(stack.http_url), "t256")
    status, body, headers = await _post(stack.http_url, "t64", "Read the sign")
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    assert "no ready replica in tier t64" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    # reading -> t256 (cold); nothing warm above, so the nearest warm tier below answers
    status, _, headers = await _post(stack.http_url, "auto", "Read the sign")
    assert status == 200 and headers["x-foveal-tier"] == "t16"
    assert not stack.pool("t256").pool.requests and not stack.pool("t64").pool.requests
    # the demand for the cold tier is counted before the fallback
    assert _demand(await _metrics(stack.http_url), "t256") == before + 1


async def test_new_endpoints_are_used_and_removed_ones_dropped(stack: LocalStack) -> None:
    pools = stack.core.pools
    t4_url = stack.pool("t4").url
    _swap(stack, cold=set(), drop=frozenset({"t4"}))
    status, body, _ = await _post(stack.http_url, "t4", "Read the sign")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    await pools.check_health()  # the periodic round, run now
    assert t4_url not in {s.url for s in pools._states._by_url.values()}
    assert pools.available("t4") == 0
    # the ModelPool comes back: its endpoint serves at once (fresh state: healthy, closed)
    catalog, _ = catalog_from_pools(
        [
            mp(f"pool-{t.name}", t.name, t.visual_tokens, endpoints=[e.url for e in t.endpoints])
            for t in stack.core.catalog.snapshot.tiers
            if t.name != "t4"
        ]
        + [mp("pool-t4", "t4", 4, endpoints=[t4_url])]
    )
    stack.core.catalog.replace(catalog)
    assert pools.available("t4") == 1
    status, _, headers = await _post(stack.http_url, "t4", "Read the sign")
    assert status == 200 and headers["x-foveal-tier"] == "t4"
