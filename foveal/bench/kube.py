"""`foveal bench operator`: how fast the operator reacts, on a real local Kubernetes cluster.

Everything is real except what cannot run here: etcd, kube-apiserver 1.20 and
kube-controller-manager (:mod:`foveal.testing.kube`), the operator in-process (the code path of
``foveal operator run``), and a router with ``catalog.source: kubernetes`` whose ``/metrics``
the operator scales from. There is no scheduler and no kubelet, so no pod ever starts:
:class:`KubeletStandIn` does the kubelet's part and marks a pool's pods Ready (what a kubelet
reports once the readiness probe passes); the ReplicaSet and Deployment controllers then
count them, and the operator mirrors the Deployment into the ModelPool's status. (Patching the
Deployment's status directly does not work: the deployment controller recomputes it from its
ReplicaSets and reverts such a patch within milliseconds.)

Measured, each ``repetitions`` times (p50 and max):

- **reconcile**: ModelPool created -> its Deployment exists; -> its pods exist (the
  controller-manager's part); -> the ModelPool's ``Ready`` condition is True, with the pods
  marked Ready as soon as they appear;
- **wake**: the first request for a cold tier (``minReplicas: 0``, at zero replicas) reaches
  the router -> the operator has set ``spec.replicas`` to 1. Bounded by one scale interval
  (the router's demand counter is read once per pass);
- **scale to zero**: the last request -> ``spec.replicas`` back to 0; the table also shows it
  minus ``idleSecondsToZero`` (what the operator adds to the idle window it was told to wait).

The helpers here (:func:`apply_crds`, :func:`model_pool`, :class:`KubeletStandIn`,
:class:`RouterThread`, :func:`wait_for`) are shared with ``tests/e2e/test_operator_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from rich.console import Console
from rich.table import Table

from foveal.api.crds import GROUP, VERSION, crds_yaml
from foveal.config import Settings, load_settings
from foveal.operator.runner import OperatorConfig, run_operator_in_thread
from foveal.router.app import RouterApp
from foveal.testing.kube import KubeCluster, running_kube

__all__ = [
    "KubeletStandIn",
    "RouterThread",
    "apply_crds",
    "chat",
    "model_pool",
    "router_settings",
    "run_operator_bench",
    "wait_for",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
CRD_NAMES = ("modelpools.foveal.io", "routingpolicies.foveal.io")


# ---------------------------------------------------------------------------------- helpers


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = 60.0,
             interval_s: float = 0.05) -> T:  # fmt: skip
    """Poll ``probe`` until it returns something truthy (not None, False, 0 or empty);
    TimeoutError naming ``what`` after ``timeout_s`` (a deadline against hangs, not a speed
    check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def apply_crds(kube: KubeCluster) -> None:
    """``foveal operator crds | kubectl apply -f -``, then wait until both are Established."""
    kube.kubectl("apply", "-f", "-", input=crds_yaml(), check=True)
    for name in CRD_NAMES:
        kube.kubectl(
            "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", check=True
        )


def model_pool(
    name: str,
    *,
    tier: str,
    visual_tokens: int,
    port: int = 8000,
    min_replicas: int = 1,
    max_replicas: int = 1,
    scaling: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A ModelPool manifest (reference backend unless ``spec`` says otherwise)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelPool",
        "metadata": {"name": name},
        "spec": {
            "tier": tier,
            "visualTokens": visual_tokens,
            "backend": "reference",
            "image": "foveal/pool:bench",
            "port": port,
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            **({"scaling": scaling} if scaling else {}),
            **spec,
        },
    }


def _is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


class KubeletStandIn:
    """Does the kubelet's part for pods that can never run here: marks them Ready.

    ``mark_ready`` patches each pod's status (pods/status, as a kubelet does after the
    readiness probe passed): phase Running, conditions PodScheduled, Initialized,
    ContainersReady and Ready True. The ReplicaSet controller then counts the pod as ready and
    available (``minReadySeconds`` 0) and the deployment controller updates the Deployment.
    """

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.serving: set[tuple[str, str]] = set()  # (namespace, selector) kept Ready
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pods(self, namespace: str, selector: str) -> list[Any]:
        """Pods matching ``selector`` that are not being deleted."""
        items: list[Any] = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return [p for p in items if p.metadata.deletion_timestamp is None]

    def mark_ready(self, namespace: str, selector: str) -> int:
        """Mark every pod of ``selector`` Ready; returns how many there are (all Ready now)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pods = self.pods(namespace, selector)
        for pod in pods:
            if _is_ready(pod):
                continue
            conditions = [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ]
            self.core.patch_namespaced_pod_status(
                pod.metadata.name,
                namespace,
                {"status": {"phase": "Running", "conditions": conditions, "startTime": now}},
            )
        return len(pods)

    def serve(self, namespace: str, selector: str) -> None:
        """From now on, keep every pod of ``selector`` Ready (new ones too) in the background,
        as a kubelet would for pods whose readiness probe passes."""
        self.serving.add((namespace, selector))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
            self._thread.start()

    def release(self, namespace: str, selector: str) -> None:
        """Stop marking new pods of ``selector`` (those already Ready stay Ready)."""
        self.serving.discard((namespace, selector))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        from kubernetes.client.rest import ApiException

        while not self._stop.wait(0.1):
            for namespace, selector in list(self.serving):
                try:
                    self.mark_ready(namespace, selector)
                except ApiException as exc:
                    if exc.status != 404:  # 404: a pod deleted between list and patch
                        self.errors.append(exc)
                except Exception as exc:  # noqa: BLE001 - kept for the caller to inspect
                    self.errors.append(exc)


class RouterThread:
    """A :class:`RouterApp` (gateway, gRPC, Kubernetes watch) on an event loop of its own in
    a daemon thread, for synchronous callers; :meth:`stop` shuts it down and joins."""

    def __init__(self, settings: Settings) -> None:
        self.app = RouterApp(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="foveal-router", daemon=True
        )

    @property
    def url(self) -> str:
        return self.app.http_url

    def start(self, timeout_s: float = 60.0) -> RouterThread:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.app.start(), self._loop).result(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.app.stop(), self._loop).result(timeout_s)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> RouterThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def router_settings(kube: KubeCluster, namespace: str, workdir: Path, **overrides: Any) -> Settings:
    """A router on 127.0.0.1 (free ports) reading ModelPools of ``namespace`` from ``kube``."""
    base: dict[str, Any] = {
        "gateway": {"host": "127.0.0.1", "port": 0},
        "grpc": {"host": "127.0.0.1", "port": 0},
        "store": {"url": f"sqlite:///{workdir / 'router.db'}", "batch_interval_s": 0.05},
        "catalog": {
            "source": "kubernetes",
            "kubeconfig": str(kube.kubeconfig),
            "namespace": namespace,
            "initial_sync_timeout_s": 30,
        },
        "pool_client": {"health_interval_s": 0.2, "breaker_reset_s": 1.0},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(**base)


def chat(url: str, model: str, *, timeout_s: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """POST one short chat completion; (status, headers with lower-case names, JSON body)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, _lower(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers), json.loads(exc.read() or b"null")


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# ------------------------------------------------------------------------------ the bench


@dataclass
class Sample:
    metric: str
    seconds: float


@dataclass
class _Bench:
    kube: KubeCluster
    namespace: str
    api: Any  # kubernetes ApiClient
    kubelet: KubeletStandIn
    router: RouterThread
    poll_s: float
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def pool(self, name: str) -> dict[str, Any] | None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            found = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "modelpools", name
            )
            return cast(dict[str, Any], found)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, manifest: dict[str, Any]) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.api).create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "modelpools", manifest
        )

    def delete(self, name: str) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.api).delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "modelpools", name
        )

    def deployment_exists(self, name: str) -> bool:
        from kubernetes import client

        found = client.AppsV1Api(self.api).list_namespaced_deployment(
            self.namespace, field_selector=f"metadata.name=foveal-pool-{name}"
        )
        return bool(found.items)

    def ready(self, name: str) -> bool:
        pool = self.pool(name) or {}
        conditions = (pool.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def replicas(self, name: str) -> int | None:
        return ((self.pool(name) or {}).get("spec") or {}).get("replicas")

    def reconcile_once(self, i: int) -> list[Sample]:
        name = f"bench-r{i}"
        selector = f"app.kubernetes.io/instance={name}"
        t0 = time.monotonic()
        self.create(model_pool(name, tier=f"r{i}", visual_tokens=16))
        wait_for(lambda: self.deployment_exists(name), "the Deployment", interval_s=self.poll_s)
        t_dep = time.monotonic()
        wait_for(lambda: self.kubelet.pods(self.namespace, selector), "the pods", 60, self.poll_s)
        t_pods = time.monotonic()
        self.kubelet.mark_ready(self.namespace, selector)
        try:
            wait_for(lambda: self.ready(name), "Ready=True", interval_s=self.poll_s)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self._describe(name, selector)}") from None
        t_ready = time.monotonic()
        self.delete(name)
        return [
            Sample("reconcile: create -> Deployment exists", t_dep - t0),
            Sample("reconcile: create -> pods exist (controller-manager)", t_pods - t0),
            Sample("reconcile: pods Ready -> ModelPool Ready", t_ready - t_pods),
            Sample("reconcile: create -> ModelPool Ready", t_ready - t0),
        ]

    def _describe(self, name: str, selector: str) -> str:
        """What the pool, its Deployment and its pods look like (for a failure message)."""
        from kubernetes import client

        pool = self.pool(name) or {}
        deps = client.AppsV1Api(self.api).list_namespaced_deployment(
            self.namespace, field_selector=f"metadata.name=foveal-pool-{name}"
        )
        pods = self.kubelet.pods(self.namespace, selector)
        return (
            f"ModelPool status {json.dumps(pool.get('status'))}; Deployment status "
            f"{[d.status.to_dict() if d.status else None for d in deps.items]}; pods ready "
            f"{[(p.metadata.name, _is_ready(p)) for p in pods]}"
        )

    def scale_once(self, name: str, tier: str, idle_s: int, interval_s: float) -> list[Sample]:
        """Demand for the cold tier until the operator wakes it, a little longer, then none
        until it is back at zero. Each phase starts at a random point of the operator's
        scale interval (starting right after a pass would always measure the worst case)."""
        wait_for(lambda: self.replicas(name) == 0, "the cold tier at 0", 120, self.poll_s)
        time.sleep(self.rng.uniform(0, interval_s))
        stop = threading.Event()
        answered: list[float] = []  # when each request's answer came (its demand counted)
        refused: list[int] = []

        def load() -> None:  # ~10 requests/s pinned to the cold tier: 503, counted as demand
            while not stop.is_set():
                status, _, _ = chat(self.router.url, tier)
                answered.append(time.monotonic())
                if status != 503:
                    refused.append(status)
                stop.wait(0.1)

        loader = threading.Thread(target=load, name="bench-load", daemon=True)
        t0 = time.monotonic()
        loader.start()
        try:
            wait_for(lambda: (self.replicas(name) or 0) >= 1, "a wake", 60, self.poll_s)
            t_wake = time.monotonic()
            time.sleep(self.rng.uniform(0, interval_s))
        finally:
            stop.set()
            loader.join(30)
        if refused:
            raise RuntimeError(f"requests pinned to the cold tier got HTTP {refused[0]}, not 503")
        t_stop = answered[-1]
        wait_for(lambda: self.replicas(name) == 0, "scale to zero", idle_s + 60, self.poll_s)
        t_zero = time.monotonic()
        return [
            Sample("wake: first request -> spec.replicas 1", t_wake - t0),
            Sample("scale to zero: last request -> spec.replicas 0", t_zero - t_stop),
            Sample("scale to zero minus idleSecondsToZero", t_zero - t_stop - idle_s),
        ]


@contextmanager
def _environment(scale_interval_s: float, poll_s: float) -> Iterator[tuple[_Bench, OperatorConfig]]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="foveal-bench-")))
        kube = stack.enter_context(running_kube())
        apply_crds(kube)
        ns = kube.create_namespace("bench")
        api = stack.enter_context(kube.api_client())
        router = stack.enter_context(RouterThread(router_settings(kube, ns, workdir)))
        config = OperatorConfig(
            namespaces=(ns,),
            kubeconfig=str(kube.kubeconfig),
            router_metrics=(f"{router.url}/metrics",),
            scale_interval_s=scale_interval_s,
        )
        stack.enter_context(run_operator_in_thread(config))
        yield _Bench(kube, ns, api, KubeletStandIn(api), router, poll_s), config


def _summary(samples: list[Sample]) -> list[dict[str, Any]]:
    rows = []
    for metric in dict.fromkeys(s.metric for s in samples):
        values = [s.seconds for s in samples if s.metric == metric]
        rows.append(
            {
                "metric": metric,
                "n": len(values),
                "p50_ms": round(statistics.median(values) * 1000, 1),
                "max_ms": round(max(values) * 1000, 1),
            }
        )
    return rows


def run_operator_bench(
    *,
    repetitions: int = 10,
    scale_interval_s: float = 1.0,
    idle_seconds: int = 3,
    poll_s: float = 0.01,
    out: Path | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Run both measurements; print a table; return its rows (and write them to ``out``)."""
    console = console or Console()
    logging.getLogger("kopf").setLevel(logging.WARNING)
    samples: list[Sample] = []
    began = time.monotonic()
    with _environment(scale_interval_s, poll_s) as (bench, _):
        console.print(f"cluster ready, namespace {bench.namespace}; router {bench.router.url}")
        for i in range(repetitions):
            samples += bench.reconcile_once(i)
        cold = model_pool(
            "bench-cold",
            tier="cold",
            visual_tokens=4,
            min_replicas=0,
            max_replicas=2,
            scaling={
                "idleSecondsToZero": idle_seconds,
                "scaleDownStabilizationSeconds": 0,
                "targetInFlightPerReplica": 4,
            },
        )
        bench.create(cold)
        for _ in range(repetitions):
            samples += bench.scale_once("bench-cold", "cold", idle_seconds, scale_interval_s)
    rows = _summary(samples)
    table = Table(
        title=(
            f"operator on a local Kubernetes 1.20 ({repetitions} repetitions, scale interval "
            f"{scale_interval_s:g}s, idleSecondsToZero {idle_seconds}s, polled every "
            f"{poll_s * 1000:g} ms)"
        )
    )
    for col in ("metric", "n", "p50 (ms)", "max (ms)"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        table.add_row(r["metric"], str(r["n"]), f"{r['p50_ms']:.1f}", f"{r['max_ms']:.1f}")
    console.print(table)
    console.print(f"total {time.monotonic() - began:.0f}s")
    if out is not None:
        settings = {
            "repetitions": repetitions,
            "scale_interval_s": scale_interval_s,
            "idle_seconds": idle_seconds,
            "poll_s": poll_s,
        }
        out.write_text(
            json.dumps(
                {"settings": settings, "rows": rows, "samples": [asdict(s) for s in samples]},
                indent=2,
            )
            + "\n"
        )
        console.print(f"wrote {out}")
    return rows
