"""The Helm charts installed into a real Kubernetes 1.20 API server, and the router and the
operator run under the RBAC the chart gives them.

The Helm engine (``helm_python``) installs ``foveal-crds`` and ``foveal``; the API server checks
every object (the ModelPools against the generated CRD schema). Then the real processes run as
subprocesses with tokens of the chart's own ServiceAccounts (TokenRequest API): the router loads
the config the chart installed and serves the tiers of the installed ModelPools; the operator
reconciles them into Deployments and Services. A missing RBAC rule fails here. No pod runs
(there is no kubelet), so the pools stay cold.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from foveal.api.crds import GROUP, VERSION
from foveal.testing.kube import KubeCluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "foveal"
CRDS_CHART = REPO / "helm" / "foveal-crds"
CRDS = ("modelpools.foveal.io", "routingpolicies.foveal.io")

VALUES: dict[str, Any] = {
    "pools": {
        "t4": None,
        "t64": {"backend": "vllm", "model": "Qwen/Qwen2-VL-2B-Instruct", "maxReplicas": 3},
        "t256": {"enabled": False},
    },
    "config": {"catalog": {"initial_sync_timeout_s": 20}},
}
TIERS = {"t1": 1, "t16": 16, "t64": 64}


def _wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Poll ``probe`` until it returns something truthy (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _missing(rendered: Any, stored: Any, path: str = "spec") -> list[str]:
    """Fields of ``rendered`` that ``stored`` lacks or changed (the API server may add
    defaults, but a field its schema does not declare would be pruned)."""
    if isinstance(rendered, dict) and isinstance(stored, dict):
        return [
            miss
            for key, value in rendered.items()
            for miss in (
                _missing(value, stored[key], f"{path}.{key}")
                if key in stored
                else [f"{path}.{key}"]
            )
        ]
    return [] if rendered == stored else [f"{path}: {rendered!r} stored as {stored!r}"]


def _get(kube: KubeCluster, path: str) -> Any:
    try:
        return kube.request("GET", path)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _adopt_existing_crds(kube: KubeCluster, release: str, namespace: str) -> None:
    """The cluster is shared by the session: CRDs another test applied with kubectl would stop
    the install ("exists and cannot be imported"). Helm adopts objects that carry its
    ownership label and annotations, which is also how an operator hands kubectl-made CRDs
    over to the chart."""
    for name in CRDS:
        if _get(kube, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"):
            kube.kubectl(
                "label", "--overwrite", "crd", name, "app.kubernetes.io/managed-by=Helm", check=True
            )
            kube.kubectl(
                "annotate", "--overwrite", "crd", name,
                f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}",
                check=True,
            )  # fmt: skip


def _service_account_kubeconfig(kube: KubeCluster, namespace: str, account: str, out: Path) -> Path:
    """A kubeconfig that authenticates as ``account`` with a token from the TokenRequest API."""
    token = kube.kubectl(
        "create", "token", account, "-n", namespace, "--duration=1h", check=True
    ).stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "e2e", "cluster": {"server": kube.server, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {
                "name": account,
                "context": {"cluster": "e2e", "user": account, "namespace": namespace},
            }
        ],
        "current-context": account,
    }
    out.write_text(yaml.safe_dump(config))
    return out


def _container(kube: KubeCluster, namespace: str, deployment: str) -> dict[str, Any]:
    dep = kube.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(container)


@contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOVEAL_", "KUBECONFIG"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _log_has(log: Path, proc: subprocess.Popen[bytes], pattern: str) -> re.Match[str] | None:
    text = log.read_text(errors="replace")
    if proc.poll() is not None:
        pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{text[-3000:]}")
    return re.search(pattern, text)


def _http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Installed:
    """The two releases in one namespace, with the router and the operator running as
    subprocesses under their ServiceAccounts' tokens."""

    kube: KubeCluster
    ns: str
    helm: helm.Config
    release: dict[str, Any]
    router_url: str
    router: subprocess.Popen[bytes]
    operator: subprocess.Popen[bytes]
    operator_log: Path

    def pools(self) -> list[dict[str, Any]]:
        return list(
            _get(self.kube, f"/apis/{GROUP}/{VERSION}/namespaces/{self.ns}/modelpools")["items"]
        )

    def operator_alive(self) -> None:
        _log_has(self.operator_log, self.operator, r"$^")


def _install(kube: KubeCluster, ns: str, config: helm.Config) -> dict[str, Any]:
    """The CRDs, then Foveal, through the real engine (the API server validates each object)."""
    _adopt_existing_crds(kube, "foveal-crds", ns)
    crds = config.install(CRDS_CHART, "foveal-crds", namespace=ns)
    assert crds["status"] == "deployed", crds
    for name in CRDS:
        kube.kubectl(
            "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", check=True
        )
    release = config.install(CHART, "foveal", VALUES, namespace=ns)
    assert release["status"] == "deployed", release
    return dict(release)


def _router_argv_env(kube: KubeCluster, ns: str, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The router's container command and environment, adapted to a process on loopback."""
    kubeconfig = _service_account_kubeconfig(kube, ns, "foveal-router", tmp / "router.kubeconfig")
    container = _container(kube, ns, "foveal-router")
    configmap = kube.request("GET", f"/api/v1/namespaces/{ns}/configmaps/foveal-config")
    config_file = tmp / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"])
    argv = [str(a) for a in container["command"]]
    assert argv[:3] == ["foveal", "router", "serve"]
    argv = [sys.executable, "-m", "foveal", *argv[1:]]
    argv[argv.index("--config") + 1] = str(config_file)
    env = _base_env()
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.update(
        {
            # Loopback and free ports here; in the pod, 0.0.0.0 and the container ports.
            "FOVEAL_GATEWAY__HOST": "127.0.0.1",
            "FOVEAL_GATEWAY__PORT": "0",
            "FOVEAL_GRPC__HOST": "127.0.0.1",
            "FOVEAL_GRPC__PORT": "0",
            "FOVEAL_STORE__URL": f"sqlite:///{tmp / 'foveal.db'}",
            # In the pod: the mounted service-account token and namespace file.
            "FOVEAL_CATALOG__KUBECONFIG": str(kubeconfig),
            "FOVEAL_CATALOG__NAMESPACE": ns,
        }
    )
    return argv, env


def _operator_argv(kube: KubeCluster, ns: str, tmp: Path, router_url: str) -> list[str]:
    """The operator's container command, reading demand from the router process."""
    kubeconfig = _service_account_kubeconfig(kube, ns, "foveal-operator", tmp / "op.kubeconfig")
    argv = [str(a) for a in _container(kube, ns, "foveal-operator")["command"]]
    assert argv[:3] == ["foveal", "operator", "run"]
    argv[argv.index("--router-metrics") + 1] = f"{router_url}/metrics"
    argv[argv.index("--scale-interval") + 1] = "1"
    return [sys.executable, "-m", "foveal", *argv[1:], "--kubeconfig", str(kubeconfig)]


@pytest.fixture(scope="module")
def installed(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("helm")
    ns = kube.create_namespace("helm")
    config = helm.Config(kubeconfig_path=str(kube.kubeconfig), namespace=ns)
    release = _install(kube, ns, config)
    with ExitStack() as stack:
        argv, env = _router_argv_env(kube, ns, tmp)
        router_log = tmp / "router.log"
        router = stack.enter_context(_process(argv, env, router_log))
        match = _wait_for(
            "the router to start",
            lambda: _log_has(router_log, router, r"gateway (http://127\.0\.0\.1:\d+)"),
        )
        router_url = match.group(1)
        operator_log = tmp / "operator.log"
        op_argv = _operator_argv(kube, ns, tmp, router_url)
        operator = stack.enter_context(_process(op_argv, _base_env(), operator_log))
        yield Installed(kube, ns, config, release, router_url, router, operator, operator_log)
    for name in ("foveal", "foveal-crds"):
        config.uninstall(name, ignore_not_found=True)


def test_model_pools_are_stored_as_rendered(installed: Installed) -> None:
    """Every ModelPool as the chart rendered it: nothing pruned by the CRD's schema."""
    rendered = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all(installed.release["manifest"])
        if d and d["kind"] == "ModelPool"
    }
    assert set(rendered) == set(TIERS)
    stored = {p["metadata"]["name"]: p for p in installed.pools()}
    for name, doc in rendered.items():
        assert _missing(doc["spec"], stored[name]["spec"]) == [], name
        assert "replicas" not in doc["spec"]


def test_router_serves_the_installed_pools_under_its_rbac(installed: Installed) -> None:
    def tiers_served() -> dict[str, int] | None:
        status, body = _http_json(f"{installed.router_url}/v1/models")
        assert status == 200, body
        found = {m["id"]: m.get("visual_tokens") for m in body["data"] if m["id"] != "auto"}
        return found if found == TIERS else None

    _wait_for("the router to serve the installed ModelPools", tiers_served)
    # No pod runs here, so every tier is cold and the router says it cannot serve yet.
    status, ready = _http_json(f"{installed.router_url}/readyz")
    assert status == 503 and ready["available_endpoints"] == dict.fromkeys(TIERS, 0)


def test_operator_reconciles_every_pool_under_its_rbac(installed: Installed) -> None:
    kube, ns = installed.kube, installed.ns

    def reconciled() -> bool:
        installed.operator_alive()
        for tier in TIERS:
            pool = kube.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/modelpools/{tier}")
            status = pool.get("status") or {}
            if not status.get("selector") or not status.get("endpoints"):
                return False
            if not _get(kube, f"/apis/apps/v1/namespaces/{ns}/deployments/foveal-pool-{tier}"):
                return False
            if not _get(kube, f"/api/v1/namespaces/{ns}/services/foveal-pool-{tier}"):
                return False
        return True

    _wait_for("the operator to reconcile every ModelPool", reconciled, timeout_s=90)
    # The vLLM tier's server gets the chart's max_pixels (visualTokens * 28 * 28).
    t64 = kube.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/foveal-pool-t64")
    (pool_container,) = t64["spec"]["template"]["spec"]["containers"]
    command = pool_container.get("command", []) + pool_container.get("args", [])
    kwargs = json.loads(command[command.index("--mm-processor-kwargs") + 1])
    assert kwargs["max_pixels"] == 64 * 28 * 28
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1]) == {"image": 1}

    # The autoscaler read the router's /metrics (the URL the chart passes) and recorded the
    # demand of every tier.
    def demand_recorded() -> bool:
        installed.operator_alive()
        for pool in installed.pools():
            if not ((pool.get("status") or {}).get("demand") or {}).get("observedAt"):
                return False
        return True

    _wait_for("the operator to record each tier's demand", demand_recorded)
    forbidden = [
        line
        for line in installed.operator_log.read_text(errors="replace").splitlines()
        if re.search(r"\b(401|403)\b|Forbidden|Unauthorized", line)  # not a port like 40109
    ]
    assert forbidden == [], "\n".join(forbidden)


def test_upgrade_keeps_the_replicas_the_operator_set(installed: Installed) -> None:
    """The chart never renders spec.replicas: an upgrade changes what the values say and
    leaves the operator's scaling alone."""
    kube, ns = installed.kube, installed.ns
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/modelpools/t16"
    replicas = _wait_for(
        "the operator to set t16's replicas",
        lambda: kube.request("GET", path)["spec"].get("replicas"),
    )
    values = json.loads(json.dumps(VALUES))
    values["pools"]["t16"] = {"maxReplicas": 5}
    upgraded = installed.helm.upgrade(CHART, "foveal", values, namespace=ns)
    assert upgraded["status"] == "deployed" and upgraded["revision"] == 2, upgraded
    spec = kube.request("GET", path)["spec"]
    assert (spec["maxReplicas"], spec["replicas"]) == (5, replicas)


def test_uninstall_removes_the_pools_and_their_children(installed: Installed) -> None:
    """``helm uninstall`` deletes the operator's Role in the same pass as the ModelPools, so
    a finalizer on them would keep them Terminating: the operator must not put one there."""
    kube, ns = installed.kube, installed.ns
    pools = installed.pools()
    assert pools and [p["metadata"].get("finalizers") for p in pools] == [None] * len(pools)
    installed.helm.uninstall("foveal")  # while the operator runs, as in a cluster
    _wait_for("the ModelPools to go with the release", lambda: not installed.pools(), 20)
    _wait_for(
        "the pools' Deployments to be garbage-collected",
        lambda: (
            not [
                d
                for d in _get(kube, f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]
                if d["metadata"]["name"].startswith("foveal-pool-")
            ]
        ),
    )


def test_crds_outlive_their_release(installed: Installed) -> None:
    installed.helm.uninstall("foveal", ignore_not_found=True)
    installed.helm.uninstall("foveal-crds")
    for name in CRDS:  # resource-policy: keep
        assert _get(
            installed.kube, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        )
