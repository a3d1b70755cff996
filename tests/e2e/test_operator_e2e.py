"""The operator on a real Kubernetes 1.20 control plane, scaling from a real router's demand.

Real here: etcd, kube-apiserver and kube-controller-manager (``foveal.testing.kube``; the
Deployment, ReplicaSet and garbage-collector controllers act), the CRDs installed the
documented way (``foveal operator crds | kubectl apply -f -``), the kubernetes Python client
and kubectl, the operator (kopf, in-process: the code of ``foveal operator run``) and the
router (``catalog.source: kubernetes``, HTTP on 127.0.0.1) whose ``/metrics`` the operator
scales from.

Stand-ins for what cannot run here, and how they work:

- **No scheduler, no kubelet**: the ReplicaSet controller creates the pods, but they never
  start. The test plays the kubelet (:class:`foveal.bench.kube.KubeletStandIn`): it patches
  the pods' status to Ready, as a kubelet does once the readiness probe passes, and only
  for the pools the test says are up. The ReplicaSet and Deployment controllers then count
  them and the operator mirrors the Deployment into the ModelPool's status. (Patching the
  Deployment's status directly would not stick: the deployment controller recomputes it
  from its ReplicaSets at once.)
- **No cluster DNS or kube-proxy**: the operator publishes
  ``http://foveal-pool-<name>.<ns>.svc:<spec.port>`` in ``status.endpoints``. For this
  process (the router runs in it) exactly those names resolve to 127.0.0.1 (a wrapper
  around ``socket.getaddrinfo``), and each ModelPool's ``spec.port`` is the port of a
  FakePool (vLLM's wire contract) on 127.0.0.1. The router therefore sends to the very URLs
  the operator published; the fake pool stands in for the pods behind the Service.

The garbage collector (kube-controller-manager) discovers new resource types every 30 s; the
fixture waits until it follows ModelPools (the CRDs may be seconds old here), so deletions are
collected at once, as in a cluster where the CRDs were installed long before.

The tests run in file order and share one namespace, router and operator (the module
fixture): t16 (created with the Python client, ``minReplicas: 1``) is the warm tier, t4
(created with ``kubectl apply``, ``minReplicas: 0``) the tier that sleeps and wakes. Windows
are small (scale interval 0.5 s, idle 5 s). No timing is asserted: waits are deadlines.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client, watch

from foveal.api.crds import GROUP, VERSION
from foveal.bench.kube import (
    KubeletStandIn,
    RouterThread,
    apply_crds,
    chat,
    model_pool,
    router_settings,
    wait_for,
)
from foveal.operator.runner import OperatorConfig, OperatorThread, run_operator_in_thread
from foveal.testing.fakepool import FakePool, FakeScript
from foveal.testing.kube import KubeCluster
from foveal.testing.servers import ServerThread

T = TypeVar("T")
SCALE_INTERVAL_S = 0.5
IDLE_S = 5  # long enough for the steps between the wake and the first request
MODEL = "foveal-ref"
MANAGED = "app.kubernetes.io/managed-by%3Dfoveal-operator"
OWNER_KEYS = ("apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion")


def eventually(
    probe: Callable[[], T | None],
    what: str,
    timeout_s: float = 60.0,
    show: Callable[[], Any] | None = None,
) -> T:
    """Poll until ``probe`` gives something; on the deadline fail, showing ``show()``."""
    try:
        return wait_for(probe, what, timeout_s)
    except TimeoutError as exc:
        seen = "" if show is None else f"; last seen: {json.dumps(show(), indent=1)}"
        pytest.fail(f"{exc}{seen}")


def selector(name: str) -> str:
    return f"app.kubernetes.io/instance={name}"


@contextmanager
def cluster_dns(namespace: str, services: set[str]) -> Iterator[None]:
    """``<service>.<namespace>.svc`` -> 127.0.0.1 for the named Services (see the module
    docstring); every other name resolves as before."""
    real = socket.getaddrinfo
    names = {f"{s}.{namespace}.svc" for s in services}

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in names:
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.getaddrinfo = real


@dataclass
class Env:
    kube: KubeCluster
    ns: str
    api: client.ApiClient
    kubelet: KubeletStandIn
    router: RouterThread
    fakes: dict[str, FakePool]
    ports: dict[str, int]
    config: OperatorConfig
    op: OperatorThread | None = None
    gc_probe: threading.Thread | None = None
    gc_problem: list[BaseException] = field(default_factory=list)
    _op_stack: ExitStack = field(default_factory=ExitStack)

    # -- the garbage collector ---------------------------------------------------------------

    def probe_garbage_collector(self, timeout_s: float = 90.0) -> None:
        """Return once kube-controller-manager's garbage collector watches ModelPools.

        The collector discovers new resource types every 30 s. A ModelPool deleted before
        its CRD was discovered is never seen going, so its children wait for the collector's
        retry backoff (tens of seconds) instead of going at once. In a cluster the CRDs are
        installed long before; here they may be seconds old. So: make a ModelPool (in a
        namespace the operator does not serve) with a ConfigMap it owns, delete it, and see
        whether the ConfigMap goes within 2 s; repeat with new objects until it does."""
        ns = self.kube.create_namespace("gc")
        core = client.CoreV1Api(self.api)
        deadline = time.monotonic() + timeout_s
        for i in itertools.count():
            owner = self.objects.create_namespaced_custom_object(
                GROUP, VERSION, ns, "modelpools",
                model_pool(f"probe-{i}", tier="probe", visual_tokens=1),
            )  # fmt: skip
            ref = {k: owner[k] for k in ("apiVersion", "kind")}
            ref.update(name=owner["metadata"]["name"], uid=owner["metadata"]["uid"])
            core.create_namespaced_config_map(
                ns, {"metadata": {"name": f"probe-{i}", "ownerReferences": [ref]}}
            )
            self.objects.delete_namespaced_custom_object(
                GROUP, VERSION, ns, "modelpools", f"probe-{i}"
            )
            try:
                wait_for(
                    lambda n=f"probe-{i}": (
                        not core.list_namespaced_config_map(
                            ns, field_selector=f"metadata.name={n}"
                        ).items
                    ),
                    "the garbage collector",
                    timeout_s=2.0,
                    interval_s=0.1,
                )
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        core.delete_namespace(ns)

    def wait_for_garbage_collector(self) -> None:
        if self.gc_probe is not None:
            self.gc_probe.join(120)
        if self.gc_problem:
            raise self.gc_problem[0]

    # -- the operator ------------------------------------------------------------------------

    def start_operator(self) -> OperatorThread:
        self.op = self._op_stack.enter_context(run_operator_in_thread(self.config))
        return self.op

    def stop_operator(self) -> None:
        self._op_stack.close()
        self.op = None

    # -- objects -----------------------------------------------------------------------------

    @property
    def objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def get(self, path: str) -> Any:
        try:
            return self.kube.request("GET", path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def pool(self, name: str) -> dict[str, Any]:
        return dict(
            self.objects.get_namespaced_custom_object(GROUP, VERSION, self.ns, "modelpools", name)
        )

    def patch_pool(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self.objects.patch_namespaced_custom_object(
                GROUP, VERSION, self.ns, "modelpools", name, {"spec": spec}
            )
        )

    def pool_if(self, name: str, predicate: Callable[[dict[str, Any]], bool]) -> Any:
        """The pool when ``predicate`` holds for it, else None (for :func:`eventually`)."""
        pool = self.pool(name)
        return pool if predicate(pool) else None

    def deployment(self, name: str) -> Any:
        return self.get(f"/apis/apps/v1/namespaces/{self.ns}/deployments/foveal-pool-{name}")

    def service(self, name: str) -> Any:
        return self.get(f"/api/v1/namespaces/{self.ns}/services/foveal-pool-{name}")

    def pdb(self, name: str) -> Any:
        return self.get(
            f"/apis/policy/v1beta1/namespaces/{self.ns}/poddisruptionbudgets/foveal-pool-{name}"
        )

    def events(self, name: str) -> list[str]:
        """Reasons of the Events about ModelPool ``name``."""
        found = client.CoreV1Api(self.api).list_namespaced_event(
            self.ns, field_selector=f"involvedObject.kind=ModelPool,involvedObject.name={name}"
        )
        return [e.reason for e in found.items]

    def settled(self, name: str) -> dict[str, Any] | None:
        """The pool once the operator has caught up with its spec: ``status.observedGeneration``
        and every condition's ``observedGeneration`` equal ``metadata.generation``."""
        pool = self.pool(name)
        generation = pool["metadata"]["generation"]
        status = pool.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        if status.get("observedGeneration") != generation or "replicas" not in pool["spec"]:
            return None
        if set(conditions) != {"Ready", "Scaling", "Degraded"}:
            return None
        if any(c.get("observedGeneration") != generation for c in conditions.values()):
            return None
        return pool

    def readyz(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.router.url}/readyz", timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))


def conditions(pool: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (pool.get("status") or {}).get("conditions") or []}


def condition_is(pool: dict[str, Any], type_: str, status: str, reason: str) -> bool:
    c = conditions(pool).get(type_) or {}
    return c.get("status") == status and c.get("reason") == reason


@pytest.fixture(scope="module")
def env(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("operator-e2e")
    apply_crds(kube)
    ns = kube.create_namespace("op")
    with ExitStack() as stack:
        fakes, ports = {}, {}
        for tier, tokens in (("t16", 16), ("t4", 4)):
            fake = FakePool(model=MODEL, visual_tokens=tokens, script=FakeScript())
            server = ServerThread(fake.app).start()
            stack.callback(server.stop)
            fakes[tier], ports[tier] = fake, server.port
        stack.enter_context(cluster_dns(ns, {f"foveal-pool-{t}" for t in fakes}))
        api = stack.enter_context(kube.api_client())
        kubelet = KubeletStandIn(api)
        stack.callback(kubelet.stop)
        settings = router_settings(
            kube, ns, tmp, policy={"default_tier": "t4"}, pool_client={"request_timeout_s": 20}
        )
        router = stack.enter_context(RouterThread(settings))
        config = OperatorConfig(
            namespaces=(ns,),
            kubeconfig=str(kube.kubeconfig),
            router_metrics=(f"{router.url}/metrics",),
            scale_interval_s=SCALE_INTERVAL_S,
        )
        state = Env(kube, ns, api, kubelet, router, fakes, ports, config)

        def probe() -> None:
            try:
                state.probe_garbage_collector()
            except BaseException as exc:  # reported by wait_for_garbage_collector
                state.gc_problem.append(exc)

        # Children made before the garbage collector knows ModelPools would be collected
        # only after its retry backoff: probe it (concurrently with the start-ups) first.
        state.gc_probe = threading.Thread(target=probe, name="gc-probe", daemon=True)
        state.gc_probe.start()
        stack.callback(state.wait_for_garbage_collector)
        stack.callback(state.stop_operator)
        state.start_operator()
        state.wait_for_garbage_collector()
        yield state
        assert kubelet.errors == []


# ---------------------------------------------------------------------------------- tests


def test_pools_from_the_python_client_and_kubectl_get_children_and_status(env: Env) -> None:
    ns = env.ns
    env.objects.create_namespaced_custom_object(
        GROUP, VERSION, ns, "modelpools",
        model_pool("t16", tier="t16", visual_tokens=16, port=env.ports["t16"], min_replicas=1,
                   max_replicas=3, scaling={"targetInFlightPerReplica": 1}),
    )  # fmt: skip
    t4 = model_pool(
        "t4", tier="t4", visual_tokens=4, port=env.ports["t4"], min_replicas=0, max_replicas=2,
        scaling={"targetInFlightPerReplica": 1, "idleSecondsToZero": IDLE_S,
                 "scaleDownStabilizationSeconds": 0},
    )  # fmt: skip
    env.kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(t4), check=True)

    for name, replicas, not_ready in (("t16", 1, "NoReadyReplicas"), ("t4", 0, "ScaledToZero")):
        pool = eventually(
            lambda n=name: env.settled(n),
            f"ModelPool {name} to settle",
            show=lambda n=name: {k: env.pool(n)[k] for k in ("spec", "status")},
        )
        meta, spec, status = pool["metadata"], pool["spec"], pool["status"]
        assert spec["replicas"] == replicas  # defaulted to minReplicas through /scale
        assert meta.get("finalizers") is None  # deletable without the operator
        port = env.ports[name]
        dep, svc = env.deployment(name), env.service(name)
        for child in (dep, svc):
            (owner,) = child["metadata"]["ownerReferences"]
            assert {k: owner[k] for k in OWNER_KEYS} == {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelPool", "name": name,
                "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True,
            }  # fmt: skip
            assert child["metadata"]["labels"] == {
                "app.kubernetes.io/name": "foveal-pool",
                "app.kubernetes.io/instance": name,
                "app.kubernetes.io/managed-by": "foveal-operator",
                "foveal.io/tier": name,
            }
        assert dep["spec"]["replicas"] == replicas
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["command"] == [
            "foveal", "pool", "serve", "--tier", name, "--mechanism", "resolution",
            "--host", "0.0.0.0", "--port", str(port),
        ]  # fmt: skip
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(port, "http")]
        assert (
            status["selector"]
            == f"app.kubernetes.io/instance={name},app.kubernetes.io/name=foveal-pool"
        )
        assert status["endpoints"] == [f"http://foveal-pool-{name}.{ns}.svc:{port}"]
        assert condition_is(pool, "Ready", "False", not_ready)
        assert condition_is(pool, "Degraded", "False", "AsExpected")
        assert env.pdb(name) is None  # one replica or none: no PodDisruptionBudget

    # The printer columns: Tier, Tokens, Backend, Desired (spec.replicas), Ready, Age.
    table = env.kube.kubectl("get", "modelpools", "-n", ns, check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "TIER", "TOKENS", "BACKEND", "DESIRED", "READY", "AGE"]
    rows = {line.split()[0]: line.split()[1:6] for line in table[1:]}
    assert rows == {
        "t16": ["t16", "16", "reference", "1", "0"],
        "t4": ["t4", "4", "reference", "0", "0"],
    }


def test_ready_pods_reach_the_modelpool_and_the_routers_catalog(env: Env) -> None:
    # The router already lists both tiers, cold: no replica is ready.
    assert env.readyz()["available_endpoints"] == {"t4": 0, "t16": 0}
    env.kubelet.serve(env.ns, selector("t16"))
    pool = eventually(
        lambda: env.pool_if("t16", lambda p: condition_is(p, "Ready", "True", "Serving")),
        "t16 Ready",
    )
    assert pool["status"]["readyReplicas"] == 1
    eventually(lambda: env.readyz()["available_endpoints"] == {"t4": 0, "t16": 1}, "t16 warm")
    served = len(env.fakes["t16"].requests)
    status, headers, body = chat(env.router.url, "t16")
    assert status == 200, body
    assert headers["x-foveal-tier"] == "t16"
    assert len(env.fakes["t16"].requests) == served + 1  # through the published endpoint


def test_a_spec_change_updates_the_deployment_and_the_status(env: Env) -> None:
    generation = env.pool("t16")["metadata"]["generation"]
    env.patch_pool(
        "t16",
        {
            "mechanism": "pool",
            "image": "foveal/pool:e2e-2",
            "resources": {"limits": {"cpu": "2"}},
            "nodeSelector": {"foveal.io/accelerator": "cpu"},
        },
    )
    pool = eventually(
        lambda: (
            env.settled("t16") if env.pool("t16")["metadata"]["generation"] > generation else None
        ),
        "t16 to settle on the new spec",
    )
    pod = env.deployment("t16")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][5:7] == ["--mechanism", "pool"]
    assert container["image"] == "foveal/pool:e2e-2"
    assert container["resources"] == {"limits": {"cpu": "2"}}
    assert pod["nodeSelector"] == {"foveal.io/accelerator": "cpu"}
    assert condition_is(pool, "Degraded", "False", "AsExpected")
    # The rollout's new pod becomes ready (the kubelet stand-in); Ready stays true throughout.
    eventually(
        lambda: condition_is(env.pool("t16"), "Ready", "True", "Serving") or None, "t16 Ready"
    )

    # A field removed from the spec disappears from the Deployment (server-side apply).
    env.objects.patch_namespaced_custom_object(
        GROUP, VERSION, env.ns, "modelpools", "t16", {"spec": {"nodeSelector": None}}
    )
    eventually(
        lambda: "nodeSelector" not in env.deployment("t16")["spec"]["template"]["spec"] or None,
        "the nodeSelector to leave the Deployment",
    )
    eventually(lambda: env.settled("t16"), "t16 to settle")


def test_an_invalid_spec_is_degraded_with_a_clear_message(env: Env) -> None:
    env.objects.create_namespaced_custom_object(
        GROUP, VERSION, env.ns, "modelpools",
        model_pool("t64", tier="t64", visual_tokens=64, min_replicas=1, max_replicas=2),
    )  # fmt: skip
    eventually(lambda: env.settled("t64"), "t64 to settle")
    before = env.deployment("t64")
    env.patch_pool("t64", {"minReplicas": 3, "maxReplicas": 1})
    pool = eventually(
        lambda: env.pool_if("t64", lambda p: condition_is(p, "Degraded", "True", "InvalidSpec")),
        "t64 Degraded",
    )
    degraded = conditions(pool)["Degraded"]
    assert "spec.maxReplicas (1) must be >= spec.minReplicas (3)" in degraded["message"]
    assert degraded["observedGeneration"] == pool["metadata"]["generation"]
    # Nothing was applied for the invalid spec: the Deployment keeps its spec.
    after = env.deployment("t64")
    assert (after["metadata"]["generation"], after["spec"]["replicas"]) == (
        before["metadata"]["generation"], 1,
    )  # fmt: skip

    env.patch_pool("t64", {"minReplicas": 1, "maxReplicas": 2})
    pool = eventually(lambda: env.settled("t64"), "t64 to settle on the fixed spec")
    assert condition_is(pool, "Degraded", "False", "AsExpected")

    # Invalid from the start: reported, and no child is made.
    env.objects.create_namespaced_custom_object(
        GROUP, VERSION, env.ns, "modelpools",
        model_pool("t256", tier="t256", visual_tokens=256, min_replicas=2, max_replicas=1),
    )  # fmt: skip
    pool = eventually(
        lambda: env.pool_if("t256", lambda p: condition_is(p, "Degraded", "True", "InvalidSpec")),
        "t256 Degraded",
    )
    assert (
        "spec.maxReplicas (1) must be >= spec.minReplicas (2)"
        in (conditions(pool)["Degraded"]["message"])
    )
    assert env.deployment("t256") is None and env.service("t256") is None
    env.objects.delete_namespaced_custom_object(GROUP, VERSION, env.ns, "modelpools", "t256")


def test_a_restarted_operator_changes_nothing_and_pools_delete_without_it(env: Env) -> None:
    ns = env.ns
    env.stop_operator()
    # Without the operator a ModelPool still deletes at once (no finalizer), and the garbage
    # collector removes its children.
    env.kube.kubectl("delete", "modelpool", "t64", "-n", ns, "--timeout=30s", check=True)
    eventually(
        lambda: env.deployment("t64") is None and env.service("t64") is None or None,
        "t64's children to be garbage-collected",
    )
    # A Service deleted by hand while the operator is down comes back on resume.
    env.kube.kubectl("delete", "service", "foveal-pool-t4", "-n", ns, check=True)

    def children() -> dict[str, str]:
        return {
            f"{kind}/{obj['metadata']['name']}": obj["metadata"]["resourceVersion"]
            for kind, path in (
                ("deployment", f"/apis/apps/v1/namespaces/{ns}/deployments"),
                ("service", f"/api/v1/namespaces/{ns}/services"),
            )
            for obj in env.get(f"{path}?labelSelector={MANAGED}")["items"]
        }

    def quiet() -> dict[str, str] | None:
        """The children's versions once nothing changes them for a second (the rollout of
        the spec-change test has finished)."""
        first = children()
        time.sleep(1.0)
        return first if children() == first else None

    before = eventually(quiet, "the children to be quiet")
    replicas = {n: env.pool(n)["spec"]["replicas"] for n in ("t16", "t4")}
    op = env.start_operator()
    eventually(lambda: env.service("t4"), "the resumed operator to re-create the Service")
    passes = op.operator.passes
    eventually(lambda: op.operator.passes >= passes + 3 or None, "three autoscaler passes")
    after = children()
    assert set(after) == set(before) | {"service/foveal-pool-t4"}  # no duplicates
    assert {k: v for k, v in after.items() if k != "service/foveal-pool-t4"} == before
    assert {n: env.pool(n)["spec"]["replicas"] for n in ("t16", "t4")} == replicas


def test_scaling_follows_the_routers_demand_to_zero_and_back(env: Env) -> None:
    ns, url = env.ns, env.router.url
    assert env.pool("t4")["spec"]["replicas"] == 0
    # An auto request: the policy picks t4 (the default tier), which is cold, so the nearest
    # warm tier serves it; the router counts the demand for t4.
    status, headers, body = chat(url, "auto")
    assert status == 200, body
    assert headers["x-foveal-tier"] == "t16"
    # A request pinned to the cold tier is refused with a hint when to retry.
    status, headers, body = chat(url, "t4")
    assert status == 503 and int(headers["retry-after"]) >= 1, body
    assert "no ready replica in tier t4" in body["error"]["message"]

    eventually(
        lambda: env.pool_if("t4", lambda p: p["spec"]["replicas"] == 1), "the operator to wake t4"
    )
    eventually(lambda: env.deployment("t4")["spec"]["replicas"] == 1 or None, "Deployment 1")
    eventually(lambda: "Wake" in env.events("t4") or None, "a Wake Event on the ModelPool")
    eventually(
        lambda: env.pool("t4")["status"].get("desiredReplicas") == 1 or None, "desiredReplicas 1"
    )

    # The pod is not ready yet: the tier stays cold in the router until the kubelet says so.
    assert env.readyz()["available_endpoints"]["t4"] == 0
    env.kubelet.serve(ns, selector("t4"))
    eventually(lambda: env.readyz()["available_endpoints"]["t4"] == 1 or None, "t4 warm")
    served = len(env.fakes["t4"].requests)
    status, headers, body = chat(url, "t4")
    assert (status, headers["x-foveal-tier"]) == (200, "t4"), body
    assert len(env.fakes["t4"].requests) == served + 1

    # Load: three slow requests in flight (targetInFlightPerReplica 1) -> maxReplicas (2).
    env.fakes["t4"].script.latency_s = 6.0
    with ThreadPoolExecutor(3) as pool_exec:
        futures = [pool_exec.submit(chat, url, "t4") for _ in range(3)]
        try:
            eventually(lambda: env.pool("t4")["spec"]["replicas"] == 2 or None, "scale up to 2")
            eventually(
                lambda: env.deployment("t4")["spec"]["replicas"] == 2 or None, "Deployment 2"
            )
            pdb = eventually(lambda: env.pdb("t4"), "a PodDisruptionBudget above one replica")
            assert pdb["spec"] == {
                "maxUnavailable": 1, "selector": {"matchLabels": {
                    "app.kubernetes.io/name": "foveal-pool", "app.kubernetes.io/instance": "t4"}},
            }  # fmt: skip
        finally:
            env.fakes["t4"].script.latency_s = 0.0
        assert [f.result()[0] for f in futures] == [200, 200, 200]

    # No demand: down to one replica at once (scaleDownStabilizationSeconds 0), then to zero
    # after idleSecondsToZero.
    eventually(lambda: env.pool("t4")["spec"]["replicas"] == 0 or None, "scale to zero", 60)
    eventually(lambda: "ScaleToZero" in env.events("t4") or None, "a ScaleToZero Event")
    eventually(
        lambda: env.deployment("t4")["spec"]["replicas"] == 0 and env.pdb("t4") is None or None,
        "the Deployment at 0 and no PodDisruptionBudget",
    )
    eventually(
        lambda: condition_is(env.pool("t4"), "Ready", "False", "ScaledToZero") or None,
        "t4 Ready=False (ScaledToZero)",
    )
    eventually(lambda: env.readyz()["available_endpoints"]["t4"] == 0 or None, "t4 cold again")


def test_a_routing_policy_is_accepted_and_the_router_applies_it(env: Env) -> None:
    ns = env.ns
    policy = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": "default-t16"},
        "spec": {"tenants": ["default"], "qualityWeight": 0.1, "allowedTiers": ["t16"]},
    }
    env.objects.create_namespaced_custom_object(GROUP, VERSION, ns, "routingpolicies", policy)
    # A second policy for the same tenant, with kubectl: refused, naming the first.
    dup = {**policy, "metadata": {"name": "default-wide"}, "spec": {"tenants": ["default"]}}
    env.kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(dup), check=True)

    def status_of(name: str) -> dict[str, Any]:
        obj = env.objects.get_namespaced_custom_object(GROUP, VERSION, ns, "routingpolicies", name)
        return dict(obj.get("status") or {})

    eventually(lambda: status_of("default-t16").get("accepted") is True or None, "accepted")
    (accepted,) = status_of("default-t16")["conditions"]
    assert (accepted["type"], accepted["status"], accepted["reason"]) == (
        "Accepted", "True", "Accepted",
    )  # fmt: skip
    eventually(lambda: status_of("default-wide").get("accepted") is False or None, "refused")
    (refused,) = status_of("default-wide")["conditions"]
    assert refused["reason"] == "TenantConflict" and "default-t16" in refused["message"]

    # The router applies it: a tier outside allowedTiers is forbidden when pinned.
    def pinned_t4() -> tuple[int, dict[str, str], Any]:
        return chat(env.router.url, "t4")

    def forbidden() -> tuple[int, dict[str, str], Any] | None:
        answer = pinned_t4()
        return answer if answer[0] == 403 else None

    status, _, body = eventually(forbidden, "the router to apply the policy")
    assert body["error"]["code"] == "tier_not_allowed" and "t16" in body["error"]["message"]
    status, headers, _ = chat(env.router.url, "t16")
    assert (status, headers["x-foveal-tier"]) == (200, "t16")

    env.objects.delete_namespaced_custom_object(
        GROUP, VERSION, ns, "routingpolicies", "default-t16"
    )
    # With the older policy gone, the other one governs the tenant (every tier allowed).
    eventually(lambda: status_of("default-wide").get("accepted") is True or None, "re-evaluated")
    eventually(lambda: pinned_t4()[0] != 403 or None, "the router to drop the policy")


def test_kubectl_scale_goes_through_the_scale_subresource(env: Env) -> None:
    ns = env.ns
    seen: list[int] = []
    dep = env.deployment("t16")
    w = watch.Watch()
    stopping = threading.Event()
    problems: list[BaseException] = []

    def follow(api: client.ApiClient) -> None:
        """Every version of t16's Deployment from now on (a watch misses no write)."""
        try:
            for event in w.stream(
                client.AppsV1Api(api).list_namespaced_deployment, ns,
                field_selector="metadata.name=foveal-pool-t16",
                resource_version=dep["metadata"]["resourceVersion"], timeout_seconds=60,
            ):  # fmt: skip
                seen.append(event["object"].spec.replicas)
        except Exception as exc:  # noqa: BLE001 - stop() may cut the stream mid-read
            if not stopping.is_set():
                problems.append(exc)

    with env.kube.api_client() as watch_api:
        follower = threading.Thread(target=follow, args=(watch_api,), daemon=True)
        follower.start()
        out = env.kube.kubectl("scale", "modelpool/t16", "--replicas=2", "-n", ns, check=True)
        assert "scaled" in out.stdout
        try:
            # The operator applies it to the Deployment (the autoscaler may then take it back
            # to what the demand needs: kubectl scale is subject to the autoscaler).
            eventually(lambda: 2 in seen or None, "the Deployment to get 2 replicas")
        finally:
            stopping.set()
            w.stop()
            follower.join(10)
    assert problems == []

    def scale() -> dict[str, Any]:
        out = env.kube.kubectl(
            "get", "modelpool", "t16", "-n", ns, "--subresource=scale", "-o", "json", check=True
        )
        return dict(json.loads(out.stdout))

    found = scale()
    assert found["kind"] == "Scale"
    assert found["status"]["selector"] == (
        "app.kubernetes.io/instance=t16,app.kubernetes.io/name=foveal-pool"
    )
    # The Scale's replicas are spec.replicas (read twice: the autoscaler may act in between).
    eventually(
        lambda: scale()["spec"]["replicas"] == env.pool("t16")["spec"]["replicas"] or None,
        "the Scale to show spec.replicas",
    )


def test_deleting_a_pool_garbage_collects_its_children(env: Env) -> None:
    env.kube.kubectl("delete", "modelpool", "t4", "-n", env.ns, "--timeout=30s", check=True)
    eventually(
        lambda: env.deployment("t4") is None and env.service("t4") is None or None,
        "t4's Deployment and Service to be garbage-collected",
    )
    eventually(lambda: "t4" not in env.readyz()["available_endpoints"] or None,
               "the router to drop t4")  # fmt: skip
    eventually(lambda: env.kubelet.pods(env.ns, selector("t4")) == [] or None, "t4's pods to go")
