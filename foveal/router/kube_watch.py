"""Keeps the router's catalog and tenant policies in step with ModelPools and RoutingPolicies.

The router only reads the cluster (RBAC: get/list/watch ``modelpools`` and ``routingpolicies``
in ``foveal.io``), and never on the request path: a watcher per kind lists the objects, then
watches from the list's ``resourceVersion``; on every change it rebuilds the whole
:class:`Catalog` (or :class:`TenantPolicies`) with a pure function and swaps it in with one
reference assignment, which the request path picks up on its next read.

Why a background thread per kind with the synchronous ``kubernetes`` client, not asyncio:
the synchronous client is the project's well-kept official one (the operator's stack uses it
too), its ``watch.Watch`` already handles the chunked event stream, bookmarks and
``stop()`` from another thread (it shuts the socket down, unblocking the read); a watch is
a long blocking read that must not stall the event loop that serves requests, and the only
thing it hands over is an immutable object assigned to one attribute, so the thread needs no
lock or loop hand-off. Two objects kinds, two threads: each blocks in its own watch.

Protocol per kind (the informer pattern, without a client-side cache beyond one dict):

1. list -> replace the cached objects, rebuild, remember ``metadata.resourceVersion``;
2. watch from that version (with bookmarks) for ``resync_interval_s``; apply each event;
3. when the watch ends, list again (a full resync that repairs any missed event);
   ``410 Gone`` (the version expired) relists at once; any other error waits with
   exponential backoff (capped at ``backoff_max_s``, with jitter) and relists.

Invalid objects are left out with a warning naming the object and the problem (logged once
per object version); the rest still apply.
"""

from __future__ import annotations

import logging
import random
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from foveal.api.crds import GROUP, VERSION, CrdValidationError, ModelPool
from foveal.config import CatalogSettings
from foveal.pools.catalog import Catalog, CatalogHolder, Endpoint, Tier
from foveal.router.tenant_policy import (
    Rejected,
    TenantPolicy,
    TenantPolicyHolder,
    policies_from_objects,
)

__all__ = [
    "KubeConfigError",
    "KubeWatcher",
    "ObjectCache",
    "catalog_from_pools",
]

log = logging.getLogger(__name__)

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_CONNECT_TIMEOUT_S = 5.0
_LIST_TIMEOUT_S = 30.0
_BACKOFF_INITIAL_S = 0.5
_STOP_TIMEOUT_S = 10.0


class KubeConfigError(RuntimeError):
    """No usable Kubernetes configuration (a start-up error, not retried)."""


# ------------------------------------------------------------------------- pure functions


def catalog_from_pools(objects: Iterable[Mapping[str, Any]]) -> tuple[Catalog, list[Rejected]]:
    """ModelPool objects (API server dicts) -> a :class:`Catalog`, and what was left out.

    - tiers are ordered by ``spec.visualTokens`` (then name), as :class:`Catalog` does;
    - a tier's endpoints are ``status.endpoints`` while ``status.readyReplicas > 0``; a tier
      with no ready replica stays in the catalog with no endpoints (cold): pinning it gets a
      503 with Retry-After, auto-routed requests fall back to the nearest warm tier, and the
      demand shows in ``foveal_router_tier_demand_total`` for the operator to scale from zero;
    - the cost weight of a request is the tier's visual-token count (as in the static
      defaults);
    - an invalid object is left out; two ModelPools claiming one tier: the one whose name
      sorts first serves it, the other is left out; an endpoint that is not an http(s) base
      URL is dropped (the rest of its tier stays).
    """
    pools: list[ModelPool] = []
    rejected: list[Rejected] = []
    for obj in objects:
        try:
            mp = ModelPool.from_object(obj)
        except CrdValidationError as exc:
            rejected.append(_rejected("ModelPool", obj, str(exc)))
            continue
        if mp.spec.tier == "auto":
            rejected.append(
                _rejected("ModelPool", obj, "spec.tier: 'auto' is reserved for automatic routing")
            )
            continue
        pools.append(mp)
    tiers: list[Tier] = []
    owner: dict[str, str] = {}
    for mp in sorted(pools, key=lambda p: p.metadata.name):
        spec, name = mp.spec, mp.metadata.name
        if spec.tier in owner:
            rejected.append(
                Rejected(
                    "ModelPool",
                    name,
                    mp.metadata.resource_version,
                    f"spec.tier {spec.tier!r} is already served by ModelPool {owner[spec.tier]}",
                )
            )
            continue
        owner[spec.tier] = name
        urls: list[str] = []
        for raw in mp.serving_endpoints:
            url = raw.rstrip("/")
            if not _is_base_url(url):
                rejected.append(
                    Rejected(
                        "ModelPool",
                        name,
                        mp.metadata.resource_version,
                        f"status.endpoints: {raw!r} is not an http(s) base URL; left out",
                    )
                )
            elif url not in urls:
                urls.append(url)
        tiers.append(
            Tier(
                name=spec.tier,
                visual_tokens=spec.visual_tokens,
                cost_weight=float(spec.visual_tokens),
                backend=spec.backend,
                model=spec.model,
                endpoints=tuple(Endpoint(url=u, model=spec.model) for u in urls),
            )
        )
    return Catalog(tuple(tiers)), rejected


def _is_base_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query


def _rejected(kind: str, obj: Mapping[str, Any], error: str) -> Rejected:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    rv = meta.get("resourceVersion")
    return Rejected(kind, str(meta.get("name") or "<unnamed>"), rv if rv else None, error)


class ObjectCache:
    """The objects of one kind as the last list and the watch events since say they are."""

    def __init__(self) -> None:
        self.objects: dict[str, Mapping[str, Any]] = {}
        self.resource_version: str | None = None

    def reset(self, listing: Mapping[str, Any]) -> None:
        """Replace everything with a list response (``items`` + ``metadata.resourceVersion``)."""
        self.objects = {}
        for item in listing.get("items") or []:
            name = (item.get("metadata") or {}).get("name")
            if name:
                self.objects[name] = item
        self.resource_version = (listing.get("metadata") or {}).get("resourceVersion")

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one watch event; returns whether the objects changed."""
        kind = event.get("type")
        obj = event.get("raw_object") or event.get("object") or {}
        meta = (obj.get("metadata") or {}) if isinstance(obj, Mapping) else {}
        rv = meta.get("resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return False
        name = meta.get("name")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not name:
            return False
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self.resource_version = rv or self.resource_version
        return True


# -------------------------------------------------------------------------- the watcher


class _RejectionLog:
    """Warns once per (object, version, problem), so a rebuild per event does not spam."""

    def __init__(self) -> None:
        self._seen: set[Rejected] = set()

    def report(self, rejected: list[Rejected]) -> None:
        for r in rejected:
            if r not in self._seen:
                log.warning(
                    "%s %s (resourceVersion %s) left out: %s",
                    r.kind,
                    r.name,
                    r.resource_version,
                    r.error,
                )
        self._seen = set(rejected)


class _KindWatch:
    """List + watch of one kind in a thread of its own; ``on_change`` gets every object."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        plural: str,
        settings: CatalogSettings,
        on_change: Callable[[list[Mapping[str, Any]]], None],
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._plural = plural
        self._settings = settings
        self._on_change = on_change
        self.cache = ObjectCache()
        self.synced = threading.Event()  # set after the first successful list
        self._stopping = threading.Event()
        self._watch: Any = None
        self._delivered = False  # the current watch delivered an event
        self._thread = threading.Thread(
            target=self._run, name=f"foveal-watch-{plural}", daemon=True
        )

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> bool:
        """Stop the thread; returns whether it ended within ``timeout_s``."""
        self._stopping.set()
        if not self._thread.is_alive():
            return True
        waited = 0.0
        while self._thread.is_alive() and waited < timeout_s:
            w = self._watch
            if w is not None:
                w.stop()  # shuts the watch socket down; repeated in case a new watch began
            self._thread.join(0.05)
            waited += 0.05
        return not self._thread.is_alive()

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = _BACKOFF_INITIAL_S
        gone = 0  # 410s in a row: the first relists at once, a repeat backs off
        while not self._stopping.is_set():
            self._delivered = False
            try:
                self._list()
                self._watch_once()  # returns when the server ends the watch (the resync)
                delay, gone = _BACKOFF_INITIAL_S, 0
                continue
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                gone = gone + 1 if exc.status == 410 else 0
                if gone == 1:
                    log.info("%s: resourceVersion expired (410 Gone); listing again", self._plural)
                    continue
                problem = _api_problem(exc, self._plural, self._namespace)
            except Exception as exc:  # noqa: BLE001 - the watcher must survive anything
                if self._stopping.is_set():
                    break
                gone, problem = 0, _problem(exc)
            if self._delivered:  # the connection was good until now: retry soon
                delay = _BACKOFF_INITIAL_S
            delay = self._back_off(delay, problem)

    def _back_off(self, delay: float, problem: str) -> float:
        wait = delay * random.uniform(0.5, 1.0)
        log.warning(
            "watching %s in namespace %s failed (%s); retrying in %.1fs",
            self._plural,
            self._namespace,
            problem,
            wait,
        )
        self._stopping.wait(wait)
        return min(delay * 2, self._settings.backoff_max_s)

    def _list(self) -> None:
        listing = self._api.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self._namespace,
            self._plural,
            _request_timeout=(_CONNECT_TIMEOUT_S, _LIST_TIMEOUT_S),
        )
        self.cache.reset(listing)
        self._changed()
        self.synced.set()

    def _watch_once(self) -> None:
        """Watch from the cached version until the server ends the watch (or stop())."""
        from kubernetes import watch

        w = watch.Watch()
        self._watch = w
        if self._stopping.is_set():
            return
        resync = self._settings.resync_interval_s
        kwargs: dict[str, Any] = {
            "timeout_seconds": max(1, int(resync)),
            "allow_watch_bookmarks": True,
            "_request_timeout": (_CONNECT_TIMEOUT_S, resync + 30.0),
        }
        if self.cache.resource_version:
            kwargs["resource_version"] = self.cache.resource_version
        try:
            for event in w.stream(
                self._api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self._namespace,
                self._plural,
                **kwargs,
            ):
                if self._stopping.is_set():
                    break
                self._delivered = True
                if self.cache.apply(event):
                    self._changed()
        finally:
            self._watch = None

    def _changed(self) -> None:
        try:
            self._on_change(list(self.cache.objects.values()))
        except Exception:  # a bug in a rebuild must not end the watch
            log.exception("rebuilding from %s failed; keeping the previous state", self._plural)


class KubeWatcher:
    """Watches ModelPools and RoutingPolicies and swaps the router's catalog and policies."""

    def __init__(
        self,
        settings: CatalogSettings,
        catalog: CatalogHolder,
        policies: TenantPolicyHolder,
        default_policy: TenantPolicy,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._policies = policies
        self._default = default_policy
        self._pool_rejections = _RejectionLog()
        self._policy_rejections = _RejectionLog()
        self._api_client: Any = None
        self._kinds: list[_KindWatch] = []
        self.namespace = ""

    @property
    def threads(self) -> list[threading.Thread]:
        return [k.thread for k in self._kinds]

    def start(self) -> bool:
        """Load the Kubernetes configuration, start both watches, and wait (at most
        ``initial_sync_timeout_s``) for their first list. Returns whether both listed.

        Blocks: call it from a thread (``asyncio.to_thread``) in async code. Raises
        :class:`KubeConfigError` when there is no usable configuration.
        """
        from kubernetes import client

        self._api_client, self.namespace = _load_api_client(self._settings)
        api = client.CustomObjectsApi(self._api_client)
        self._kinds = [
            _KindWatch(api, self.namespace, "modelpools", self._settings, self._on_pools),
            _KindWatch(api, self.namespace, "routingpolicies", self._settings, self._on_policies),
        ]
        for k in self._kinds:
            k.start()
        log.info("watching ModelPools and RoutingPolicies in namespace %s", self.namespace)
        timeout = self._settings.initial_sync_timeout_s
        synced = all(k.synced.wait(timeout) for k in self._kinds)
        if not synced:
            log.warning(
                "no first list of ModelPools/RoutingPolicies within %.0fs; serving with what "
                "is known and retrying in the background",
                timeout,
            )
        return synced

    def stop(self) -> None:
        """Stop both watch threads and close the API client (blocks up to ~10 s per kind)."""
        for k in self._kinds:
            if not k.stop():
                log.warning("watch thread %s did not stop in time", k.thread.name)
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = None

    def _on_pools(self, objects: list[Mapping[str, Any]]) -> None:
        catalog, rejected = catalog_from_pools(objects)
        self._pool_rejections.report(rejected)
        if catalog != self._catalog.snapshot:
            self._catalog.replace(catalog)
            log.info("catalog now %s", _describe(catalog))

    def _on_policies(self, objects: list[Mapping[str, Any]]) -> None:
        policies, rejected = policies_from_objects(objects, self._default)
        self._policy_rejections.report(rejected)
        if policies != self._policies.snapshot:
            self._policies.replace(policies)
            log.info(
                "tenant policies now: %d named tenant(s), wildcard %s",
                len(policies.by_tenant),
                policies.wildcard.source if policies.wildcard else "none",
            )


def _describe(catalog: Catalog) -> str:
    if not catalog.tiers:
        return "empty (no valid ModelPool)"
    return ", ".join(
        f"{t.name} ({len(t.endpoints)} endpoint(s))" if t.endpoints else f"{t.name} (cold)"
        for t in catalog.tiers
    )


def _problem(exc: Exception) -> str:
    """A short description of a connection-level error (urllib3's MaxRetryError repeats the
    whole URL; its ``reason`` says what went wrong)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, Exception):
        exc = reason
    return f"{type(exc).__name__}: {exc}"


def _api_problem(exc: Any, plural: str, namespace: str) -> str:
    status = getattr(exc, "status", None)
    if status == 403:
        return (
            f"403 Forbidden: the router needs get/list/watch on {plural}.{GROUP} "
            f"in namespace {namespace}"
        )
    if status == 404:
        return f"404 Not Found: is the CustomResourceDefinition {plural}.{GROUP} installed?"
    return f"HTTP {status}: {getattr(exc, 'reason', exc)}"


def _load_api_client(settings: CatalogSettings) -> tuple[Any, str]:
    """An ApiClient of its own (not the library's global default) and the namespace to watch."""
    from kubernetes import client, config

    cfg = client.Configuration()
    namespace = settings.namespace
    try:
        if settings.kubeconfig:
            config.load_kube_config(config_file=settings.kubeconfig, client_configuration=cfg)
            namespace = namespace or _kubeconfig_namespace(settings.kubeconfig)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
                if not namespace and _SA_NAMESPACE.is_file():
                    namespace = _SA_NAMESPACE.read_text().strip()
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
                namespace = namespace or _kubeconfig_namespace(None)
    except Exception as exc:
        where = settings.kubeconfig or "in-cluster service account, $KUBECONFIG, ~/.kube/config"
        raise KubeConfigError(
            f"catalog.source=kubernetes but no usable Kubernetes configuration ({where}): {exc}"
        ) from exc
    if not cfg.verify_ssl:  # said once here, instead of urllib3 warning on every request
        import urllib3

        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        log.warning("the kubeconfig turns TLS verification of the API server off")
    return client.ApiClient(cfg), namespace or "default"


def _kubeconfig_namespace(path: str | None) -> str | None:
    from kubernetes import config

    try:
        _, active = config.list_kube_config_contexts(config_file=path)
    except Exception:  # noqa: BLE001 - only a default is at stake
        return None
    ns = (active or {}).get("context", {}).get("namespace")
    return str(ns) if ns else None
