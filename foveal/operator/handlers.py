"""kopf handlers: thin I/O around the pure functions of manifests, scaling and status.

- ModelPool create/update/resume -> server-side apply Deployment + Service (+ PDB when
  replicas > 1, deleted otherwise), then status (selector, endpoints, counts, conditions).
- Deployments labelled ``app.kubernetes.io/managed-by=foveal-operator`` -> the owning
  ModelPool's replicas/readyReplicas/Ready; a deleted or hand-scaled Deployment is re-applied.
- One autoscaler loop (only with router metrics URLs) -> every ``scale_interval_s`` one scrape
  of the routers, then per ModelPool of a kopf index: demand -> desired replicas, written
  through the ModelPool's scale subresource (which triggers the update handler above), with
  a Kubernetes Event per change.
- RoutingPolicy create/update/resume/delete -> every policy of the namespace gets
  ``status.accepted`` and an ``Accepted`` condition (:func:`status.evaluate_policies`).

Deletion needs no finalizer: children carry an owner reference to their ModelPool (controller)
and the garbage collector removes them; the operator only forgets its in-memory state. No
handler may make kopf add one: kopf puts its finalizer on every object that has a timer or a
daemon (hard-wired in ``kopf.timer``/``kopf.daemon``) or a non-optional ``on.delete`` handler,
and an object with a finalizer cannot be deleted while the operator is down or has lost its
RBAC (``helm uninstall`` removes both in one pass). Hence the autoscaler is one loop over an
index of ModelPools, not a timer per object; :func:`build_registry` checks this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

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
OBSERVED: Final = "observed"  # a condition's generation: the status.observedGeneration in place


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
    autoscaler: asyncio.Task[None] | None = None
    passes: int = 0  # autoscaler passes completed (tests and logs)
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

    def start_autoscaler(self, pools: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        """Run :meth:`autoscale_loop` in the background (no-op without router metrics)."""
        if self.tracker.configured and self.autoscaler is None:
            self.autoscaler = asyncio.create_task(self.autoscale_loop(pools), name="autoscaler")

    async def close(self) -> None:
        task, self.autoscaler = self.autoscaler, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
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
        async with self._lock((ns, name)):
            # The Ready condition describes the spec the children were last applied for: the
            # status.observedGeneration at the time of writing, not the one read before the
            # lock (a reconcile may have finished in between).
            await self._write_pool_status(
                ns,
                name,
                {"replicas": have, "readyReplicas": ready},
                [st.ready_condition(wanted, ready)],
                OBSERVED,
            )

    async def autoscale_loop(self, pools: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        """Every ``scale_interval_s``: scrape the routers once, then one pass per ModelPool
        (``pools()`` gives the current objects: the kopf index). A failing pool is logged and
        retried on the next pass; the others go on."""
        interval = self.config.scale_interval_s
        while True:
            began = time.monotonic()
            try:
                await self.autoscale_pass(list(pools()))
            except Exception:  # the loop must outlive any one bad pass
                log.exception("autoscaler pass failed; retrying in %.1fs", interval)
            await asyncio.sleep(max(0.0, began + interval - time.monotonic()))

    async def autoscale_pass(self, pools: list[Mapping[str, Any]]) -> None:
        """One scrape of every router, then :meth:`autoscale` for each pool, concurrently."""
        if self.http is None:
            return
        await self.tracker.refresh(self.http)
        results = await asyncio.gather(
            *(self.autoscale(body) for body in pools), return_exceptions=True
        )
        for body, result in zip(pools, results, strict=True):
            if isinstance(result, Exception):
                meta = body.get("metadata") or {}
                log.warning(
                    "autoscaling ModelPool %s/%s failed (retried next pass): %s",
                    meta.get("namespace"),
                    meta.get("name"),
                    result,
                )
            elif isinstance(result, BaseException):
                raise result
        self.passes += 1

    async def autoscale(self, body: Mapping[str, Any]) -> None:
        """One autoscaler pass for one ModelPool."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = (ns, name)
        if meta.get("deletionTimestamp"):
            return
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
            await self._post_event(meta, decision.code, decision.reason)
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

    async def _post_event(self, meta: Mapping[str, Any], reason: str, message: str) -> None:
        """A Kubernetes Event on the ModelPool (``kubectl describe`` shows scaling decisions).

        Posted directly: the autoscaler runs outside kopf's per-object handlers, where
        ``kopf.event`` has no queue. An Event that cannot be posted is logged, never fatal.
        """
        event = st.pool_event(
            meta, reason=reason, message=message, now=st.rfc3339(self.wall()),
            component=self.config.field_manager,
        )  # fmt: skip
        try:
            await self._k.create(event)
        except (KubeApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("Event %s on ModelPool %s not posted: %s", reason, meta.get("name"), exc)

    async def _write_pool_status(
        self,
        ns: str,
        name: str,
        fields: Mapping[str, Any],
        updates: list[st.ConditionUpdate],
        generation: int | None | Literal["observed"],
    ) -> None:
        await self._write_status("ModelPool", ns, name, fields, updates, generation)

    async def _write_status(
        self,
        kind: str,
        ns: str,
        name: str,
        fields: Mapping[str, Any],
        updates: list[st.ConditionUpdate],
        generation: int | None | Literal["observed"],
    ) -> None:
        """Read-merge-patch of status with the resourceVersion as precondition (retries on a
        conflict), skipped when nothing changes, so watchers see no empty updates.

        ``generation`` goes into the updated conditions' ``observedGeneration``; ``OBSERVED``
        takes the object's ``status.observedGeneration`` as read here."""
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
                generation=status.get("observedGeneration")
                if generation == OBSERVED
                else generation,
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
                if exc.status == 404:
                    return  # deleted since the read: nothing left to report on
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
    async def startup(**kwargs: Any) -> None:
        await operator.start()
        modelpools: kopf.Index[Key, kopf.Body] = kwargs["modelpools"]  # the index below

        def current() -> list[Mapping[str, Any]]:
            return [body for key in list(modelpools) for body in modelpools.get(key, ())]

        operator.start_autoscaler(current)

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

    @kopf.index(*pools, id="modelpools", registry=registry)
    def index_pools(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        # What the autoscaler loop iterates: the latest body of every ModelPool (kopf drops
        # deleted ones). An index, unlike a timer, needs no finalizer.
        return {(namespace, name): body} if namespace else {}

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

    _check_no_finalizers(registry)
    return registry


def _check_no_finalizers(registry: kopf.OperatorRegistry) -> None:
    """Fail at start-up if a handler would make kopf block deletion with its finalizer (see
    the module docstring): ModelPools must stay deletable without the operator."""
    handlers = [
        *registry._spawning.get_all_handlers(),  # timers, daemons
        *registry._changing.get_all_handlers(),  # on.create/update/resume/delete
    ]
    blocking = [str(h.id) for h in handlers if getattr(h, "requires_finalizer", False)]
    if blocking:
        raise RuntimeError(
            "handlers that need a finalizer (ModelPools would become undeletable without the "
            f"operator): {', '.join(blocking)}"
        )
