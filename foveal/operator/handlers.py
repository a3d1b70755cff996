"""kopf handlers: thin I/O around the pure functions of manifests, scaling and status.

- ModelPool create/update/resume -> server-side apply Deployment + Service (+ PDB when
  replicas > 1, deleted otherwise), then status (selector, endpoints, counts, conditions).
- Deployments labelled ``app.kubernetes.io/managed-by=foveal-operator`` -> the owning
  ModelPool's replicas/readyReplicas/Ready; a deleted or hand-scaled Deployment is re-applied.
- A timer per ModelPool (only with router metrics URLs) -> demand -> desired replicas, written
  through the ModelPool's scale subresource (which triggers the update handler above).
- RoutingPolicy create/update/resume/delete -> every policy of the namespace gets
  ``status.accepted`` and an ``Accepted`` condition (:func:`status.evaluate_policies`).

Deletion needs no finalizer: children carry an owner reference to their ModelPool (controller)
and the garbage collector removes them; the operator only forgets its in-memory state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

from foveal.api.crds import API_VERSION, GROUP, VERSION, CrdValidationError, ModelPool
from foveal.operator import manifests as m
from foveal.operator import status as st
from foveal.operator.demand import DemandTracker
from foveal.operator.kube import (
    Credentials,
    KubeApiError,
    KubeClient,
    connection_info,
    load_credentials,
    object_path,
)
from foveal.operator.scaling import ScalingState, decide

__all__ = ["Operator", "OperatorConfig", "build_registry"]

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class OperatorConfig:
    """What ``foveal operator run`` passes in; every field has a safe default."""

    namespaces: tuple[str, ...] = ()  # empty: all namespaces (cluster-wide)
    router_metrics: tuple[str, ...] = ()  # router /metrics URLs; empty: autoscaler off
    scale_interval_s: float = 15.0
    scrape_timeout_s: float = 2.0
    kubeconfig: str | None = None
    context: str | None = None
    field_manager: str = m.MANAGED_BY
    pdb_api_version: str | None = None  # None: discover (policy/v1 if served)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


@dataclass
class Operator:
    """The operator's runtime: clients, the demand tracker and per-pool memory."""

    config: OperatorConfig
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    creds: Credentials | None = None
    kube: KubeClient | None = None
    http: aiohttp.ClientSession | None = None
    tracker: DemandTracker = field(init=False)
    pdb_version: str = m.PDB_V1BETA1
    states: dict[Key, ScalingState] = field(default_factory=dict)
    problems: dict[Key, dict[str, list[str]]] = field(default_factory=dict)
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tracker = DemandTracker(
            self.config.router_metrics,
            timeout_s=self.config.scrape_timeout_s,
            monotonic=self.monotonic,
            wall=self.wall,
        )

    # ------------------------------------------------------------------------- lifecycle

    def login(self) -> Credentials:
        self.creds = load_credentials(self.config.kubeconfig, self.config.context)
        if self.kube is not None:
            self.kube.creds = self.creds
        return self.creds

    async def start(self) -> None:
        creds = self.creds or self.login()
        self.kube = KubeClient(creds, reload=self.login)
        self.http = aiohttp.ClientSession()
        if self.config.pdb_api_version:
            self.pdb_version = self.config.pdb_api_version
        else:
            self.pdb_version = m.pdb_api_version(await self.kube.group_versions("policy"))
        log.info(
            "operator started: namespaces=%s, PodDisruptionBudget %s, router metrics %s",
            ",".join(self.config.namespaces) or "<all>",
            self.pdb_version,
            ", ".join(self.config.router_metrics) or "<none: autoscaler off>",
        )

    async def close(self) -> None:
        if self.kube is not None:
            await self.kube.close()
        if self.http is not None:
            await self.http.close()

    def _lock(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    @property
    def _k(self) -> KubeClient:
        if self.kube is None:
            raise RuntimeError("the operator is not started")
        return self.kube

    # ----------------------------------------------------------------------- ModelPool

    async def reconcile_pool(self, body: Mapping[str, Any]) -> None:
        """Make the children match the spec; idempotent (server-side apply)."""
        meta = body["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = meta.get("generation")
        key = (ns, name)
        async with self._lock(key):
            try:
                pool = ModelPool.from_object(body)
                problems = pool.spec.problems() + m.name_problems(name)
            except CrdValidationError as exc:
                pool, problems = None, exc.problems
            if pool is None or problems:
                self.problems[key] = {"InvalidSpec": problems}
                await self._write_pool_status(
                    ns, name, {"observedGeneration": generation}, self._degraded(key), generation
                )
                raise kopf.PermanentError("invalid ModelPool: " + "; ".join(problems))
            spec = pool.spec
            if spec.replicas is None:
                # Contract: spec.replicas defaults to minReplicas; the scale subresource owns it.
                replicas = m.target_replicas(spec)
                await self._scale(ns, name, replicas)
                spec = spec.model_copy(update={"replicas": replicas})
            replicas = m.target_replicas(spec)
            try:
                dep = await self._k.apply(
                    m.deployment(name, ns, uid, spec), field_manager=self.config.field_manager
                )
                await self._k.apply(
                    m.service(name, ns, uid, spec), field_manager=self.config.field_manager
                )
                pdb_path = object_path(
                    self.pdb_version, "PodDisruptionBudget", ns, m.child_name(name)
                )
                if m.needs_pdb(replicas):
                    await self._k.apply(
                        m.pod_disruption_budget(name, ns, uid, spec, self.pdb_version),
                        field_manager=self.config.field_manager,
                    )
                else:
                    await self._k.delete(pdb_path)
            except KubeApiError as exc:
                self.problems[key] = {"ApplyFailed": [str(exc)]}
                await self._write_pool_status(ns, name, {}, self._degraded(key), generation)
                raise kopf.TemporaryError(f"applying children failed: {exc}", delay=15) from exc
            self.problems[key] = {}
            wanted, have, ready = st.deployment_counts(dep)
            fields: dict[str, Any] = {
                "replicas": have,
                "readyReplicas": ready,
                "selector": m.selector_string(name),
                "endpoints": m.endpoints(name, ns, spec),
                "observedGeneration": generation,
            }
            updates = [st.ready_condition(wanted, ready), *self._degraded(key)]
            if not self.tracker.configured:
                fields["desiredReplicas"] = replicas
                updates.append(
                    st.scaling_condition(
                        "AutoscalerOff",
                        "no router metrics configured: replicas follow spec.replicas",
                        changing=False,
                    )
                )
            await self._write_pool_status(ns, name, fields, updates, generation)

    def _degraded(self, key: Key) -> list[st.ConditionUpdate]:
        return [st.degraded_condition(self.problems.get(key, {}))]

    async def _scale(self, ns: str, name: str, replicas: int) -> None:
        path = object_path(API_VERSION, "ModelPool", ns, name) + "/scale"
        await self._k.merge_patch(path, {"spec": {"replicas": replicas}})

    async def forget_pool(self, ns: str, name: str) -> None:
        self.states.pop((ns, name), None)
        self.problems.pop((ns, name), None)
        self._locks.pop((ns, name), None)

    async def deployment_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Mirror a child Deployment's counts into its ModelPool; heal deleted/drifted ones."""
        meta = body.get("metadata") or {}
        owner = next(
            (
                o
                for o in meta.get("ownerReferences") or []
                if o.get("kind") == "ModelPool" and o.get("controller")
            ),
            None,
        )
        if owner is None or not meta.get("namespace"):
            return
        ns, name = meta["namespace"], owner["name"]
        pool_path = object_path(API_VERSION, "ModelPool", ns, name)
        pool = await self._k.get(pool_path)
        if (
            pool is None
            or pool["metadata"].get("uid") != owner.get("uid")
            or pool["metadata"].get("deletionTimestamp")
        ):
            return  # the pool is gone or going: the garbage collector handles the rest
        wanted, have, ready = st.deployment_counts(None if event_type == "DELETED" else body)
        try:
            spec = ModelPool.from_object(pool).spec
        except CrdValidationError:
            return
        if event_type == "DELETED" or (
            spec.replicas is not None and wanted != m.target_replicas(spec)
        ):
            log.info("re-applying the children of ModelPool %s/%s (%s)", ns, name, event_type)
            try:
                await self.reconcile_pool(pool)
            except (kopf.PermanentError, kopf.TemporaryError) as exc:
                log.warning("re-applying ModelPool %s/%s failed: %s", ns, name, exc)
            return
        generation = (pool.get("status") or {}).get("observedGeneration")
        async with self._lock((ns, name)):
            await self._write_pool_status(
                ns,
                name,
                {"replicas": have, "readyReplicas": ready},
                [st.ready_condition(wanted, ready)],
                generation,
            )

    async def autoscale(self, body: Mapping[str, Any]) -> None:
        """One autoscaler pass for one ModelPool (the timer)."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = (ns, name)
        try:
            pool = ModelPool.from_object(body)
        except CrdValidationError:
            return
        spec = pool.spec
        if spec.replicas is None or spec.problems() or self.http is None:
            return  # the reconcile handler sets replicas / reports the problem first
        await self.tracker.refresh(self.http, max_age_s=self.config.scale_interval_s / 2)
        demand = self.tracker.demand(spec.tier)
        decision = decide(
            scaling=spec.scaling,
            min_replicas=spec.min_replicas,
            max_replicas=spec.effective_max_replicas,
            current=spec.replicas,
            demand=demand,
            state=self.states.get(key, ScalingState()),
            now=self.monotonic(),
        )
        self.states[key] = decision.state
        changing = decision.desired != spec.replicas
        if changing:
            await self._scale(ns, name, decision.desired)
            _post_event(body, decision.code, decision.reason)
            log.info("ModelPool %s/%s: %s", ns, name, decision.reason)
        message = decision.reason
        router_problems = self.tracker.problems()
        if router_problems:
            message += ". " + "; ".join(router_problems)
        fields: dict[str, Any] = {"desiredReplicas": decision.desired}
        if demand is not None and self.tracker.observed_at is not None:
            fields["demand"] = {
                "requestsPerSecond": round(demand.requests_per_second, 6),
                "inFlight": demand.in_flight,
                "observedAt": st.rfc3339(self.tracker.observed_at),
            }
        async with self._lock(key):
            await self._write_pool_status(
                ns,
                name,
                fields,
                [st.scaling_condition(decision.code, message, changing=changing)],
                meta.get("generation"),
            )

    async def _write_pool_status(
        self,
        ns: str,
        name: str,
        fields: Mapping[str, Any],
        updates: list[st.ConditionUpdate],
        generation: int | None,
    ) -> None:
        await self._write_status("ModelPool", ns, name, fields, updates, generation)

    async def _write_status(
        self,
        kind: str,
        ns: str,
        name: str,
        fields: Mapping[str, Any],
        updates: list[st.ConditionUpdate],
        generation: int | None,
    ) -> None:
        """Read-merge-patch of status with the resourceVersion as precondition (retries on a
        conflict), skipped when nothing changes, so watchers see no empty updates."""
        path = object_path(API_VERSION, kind, ns, name)
        for _ in range(5):
            obj = await self._k.get(path)
            if obj is None:
                return
            status = obj.get("status") or {}
            conditions = st.merge_conditions(
                status.get("conditions") or [],
                updates,
                now=st.rfc3339(self.wall()),
                generation=generation,
            )
            new = {k: v for k, v in fields.items() if v is not None}
            if all(status.get(k) == v for k, v in new.items()) and _same_conditions(
                status.get("conditions") or [], conditions
            ):
                return
            body = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": {**new, "conditions": conditions},
            }
            try:
                await self._k.merge_patch(path + "/status", body)
                return
            except KubeApiError as exc:
                if exc.status != 409:
                    raise
        log.warning("status of %s %s/%s not written: kept conflicting", kind, ns, name)

    # -------------------------------------------------------------------- RoutingPolicy

    async def evaluate_policies(self, ns: str) -> None:
        """Accept or reject every RoutingPolicy of ``ns`` (a tenant resolves to one policy)."""
        async with self._lock((ns, "\0routingpolicies")):
            listing = await self._k.get(object_path(API_VERSION, "RoutingPolicy", ns))
            items = (listing or {}).get("items", [])
            verdicts = st.evaluate_policies(
                [
                    st.PolicyInput(
                        name=i["metadata"]["name"],
                        created=i["metadata"].get("creationTimestamp", ""),
                        spec=i.get("spec") or {},
                    )
                    for i in items
                ]
            )
            for item in items:
                meta = item["metadata"]
                verdict = verdicts[meta["name"]]
                await self._write_status(
                    "RoutingPolicy",
                    ns,
                    meta["name"],
                    {"accepted": verdict.accepted, "observedGeneration": meta.get("generation")},
                    [st.accepted_condition(verdict)],
                    meta.get("generation"),
                )


def _post_event(body: Mapping[str, Any], reason: str, message: str) -> None:
    """A Kubernetes Event on the object (``kubectl describe`` shows scaling decisions)."""
    try:
        kopf.event(cast(kopf.Body, body), type="Normal", reason=reason, message=message)
    except LookupError:  # outside a running kopf operator (no event queue): nothing to post
        log.debug("event not posted (no operator context): %s %s", reason, message)


def _same_conditions(old: list[Any], new: list[dict[str, Any]]) -> bool:
    def strip(cs: list[Any]) -> list[Any]:
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in cs]

    return strip(old) == strip(new)


def build_registry(operator: Operator) -> kopf.OperatorRegistry:
    """A fresh kopf registry bound to ``operator`` (several operators may run in one process,
    e.g. tests; the module-level default registry is never used)."""
    registry = kopf.OperatorRegistry()
    pools = (GROUP, VERSION, "modelpools")
    policies = (GROUP, VERSION, "routingpolicies")

    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(operator.login())

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(**_: Any) -> None:
        await operator.start()

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        await operator.close()

    @kopf.on.resume(*pools, id="reconcile", registry=registry)
    @kopf.on.create(*pools, id="reconcile", registry=registry)
    @kopf.on.update(*pools, id="reconcile", registry=registry)
    async def reconcile_pool(body: kopf.Body, **_: Any) -> None:
        await operator.reconcile_pool(body)

    @kopf.on.event(*pools, id="forget", registry=registry)
    async def pool_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        if type == "DELETED" and namespace:
            await operator.forget_pool(namespace, name)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        id="mirror",
        labels={m.LABEL_MANAGED_BY: m.MANAGED_BY},
        registry=registry,
    )
    async def deployment_event(type: str, body: kopf.Body, **_: Any) -> None:
        await operator.deployment_event(type, body)

    if operator.config.router_metrics:

        @kopf.timer(
            *pools, id="autoscale", interval=operator.config.scale_interval_s, registry=registry
        )
        async def autoscale(body: kopf.Body, **_: Any) -> None:
            await operator.autoscale(body)

    @kopf.on.resume(*policies, id="evaluate", registry=registry)
    @kopf.on.create(*policies, id="evaluate", registry=registry)
    @kopf.on.update(*policies, id="evaluate", registry=registry)
    async def policy_changed(namespace: str | None, **_: Any) -> None:
        if namespace:
            await operator.evaluate_policies(namespace)

    @kopf.on.event(*policies, id="reevaluate", registry=registry)
    async def policy_event(type: str, namespace: str | None, **_: Any) -> None:
        if type == "DELETED" and namespace:  # a deleted policy may free tenants for another one
            await operator.evaluate_policies(namespace)

    return registry
