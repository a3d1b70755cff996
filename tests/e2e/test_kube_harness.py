"""The real-cluster harness works: the API server, kubectl, CRDs with a status subresource,
the controller manager (Deployment -> ReplicaSet -> Pods, garbage collection), and clean
start/stop of the processes."""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from foveal.testing import kube as kube_mod
from foveal.testing.kube import (
    KubeBinariesNotFound,
    KubeCluster,
    KubectlError,
    KubeStartError,
    running_kube,
)

pytestmark = pytest.mark.e2e

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, limit_s: float = 60.0) -> T:
    """Poll ``probe`` until it returns something other than None (a bound, not a speed check)."""
    end = time.monotonic() + limit_s
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


def test_api_server_is_kubernetes_1_20(kube: KubeCluster) -> None:
    with kube.api_client() as api:
        info = client.VersionApi(api).get_code()
    assert (info.major, info.minor) == ("1", "20")
    assert info.git_version.startswith("v1.20.")
    assert kube.request("GET", "/version")["gitVersion"] == info.git_version
    assert kube.server.startswith("https://127.0.0.1:")


def test_python_client_and_kubectl_see_the_same_objects(kube: KubeCluster) -> None:
    ns = f"harness-{secrets.token_hex(4)}"
    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))

        got = kube.kubectl("get", "namespace", ns, "-o", "json", check=True)
        assert json.loads(got.stdout)["metadata"]["name"] == ns
        assert json.loads(got.stdout)["status"]["phase"] == "Active"

        # And the other way: kubectl apply (client-side schema validation), read with Python.
        manifest = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "probe", "namespace": ns},
            "data": {"tier": "t16"},
        }
        kube.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=True)
        assert core.read_namespaced_config_map("probe", ns).data == {"tier": "t16"}

    missing = kube.kubectl("get", "namespace", f"{ns}-absent")
    assert missing.returncode != 0
    assert "not found" in missing.stderr
    with pytest.raises(KubectlError, match="not found"):
        kube.kubectl("get", "namespace", f"{ns}-absent", check=True)


def _widget_crd(group: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                },
                                "status": {
                                    "type": "object",
                                    "properties": {
                                        "phase": {"type": "string"},
                                        "readyReplicas": {"type": "integer"},
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def test_custom_resource_with_status_subresource(kube: KubeCluster, kube_namespace: str) -> None:
    group = f"t{secrets.token_hex(4)}.e2e.foveal.io"
    ns = kube_namespace
    with kube.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        ext.create_custom_resource_definition(_widget_crd(group))

        def established() -> bool | None:
            crd = ext.read_custom_resource_definition(f"widgets.{group}")
            conds = crd.status.conditions or []
            return (
                True if any(c.type == "Established" and c.status == "True" for c in conds) else None
            )

        eventually(established, "the CRD to be established")

        objs = client.CustomObjectsApi(api)
        args = (group, "v1", ns, "widgets")
        body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"}}
        created = objs.create_namespaced_custom_object(*args, {**body, "spec": {"size": 2}})
        assert created["spec"] == {"size": 2}
        generation = created["metadata"]["generation"]

        patched = objs.patch_namespaced_custom_object_status(
            *args, "w1", {"status": {"phase": "Ready", "readyReplicas": 2}}
        )
        assert patched["status"] == {"phase": "Ready", "readyReplicas": 2}
        # A status write does not touch the spec or bump the generation.
        assert patched["spec"] == {"size": 2}
        assert patched["metadata"]["generation"] == generation

        # With the subresource on, writes to the main resource ignore status.
        spec_write = objs.patch_namespaced_custom_object(
            *args, "w1", {"spec": {"size": 3}, "status": {"phase": "Broken"}}
        )
        assert spec_write["spec"] == {"size": 3}
        assert spec_write["status"]["phase"] == "Ready"
        assert spec_write["metadata"]["generation"] == generation + 1

        # The schema is enforced (size >= 1).
        with pytest.raises(ApiException) as bad:
            objs.create_namespaced_custom_object(
                *args, {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
            )
        assert bad.value.status == 422

        listed = kube.kubectl("get", f"widgets.{group}", "-n", ns, "-o", "json", check=True)
        assert [i["metadata"]["name"] for i in json.loads(listed.stdout)["items"]] == ["w1"]

        ext.delete_custom_resource_definition(f"widgets.{group}")


def test_controller_manager_reconciles_deployments(kube: KubeCluster) -> None:
    ns = kube.create_namespace("deploy")
    labels = {"app": "probe"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="probe", labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="main", image="example.invalid/probe:1")]
                ),
            ),
        ),
    )
    with kube.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        made = apps.create_namespaced_deployment(ns, deployment)

        def replica_set() -> client.V1ReplicaSet | None:
            items = apps.list_namespaced_replica_set(ns).items
            return items[0] if items else None

        rs = eventually(replica_set, "the deployment controller to make a ReplicaSet")
        owner = rs.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.uid) == ("Deployment", "probe", made.metadata.uid)
        assert rs.spec.replicas == 2

        # The ReplicaSet controller makes the pods; with no scheduler or kubelet they stay
        # Pending on no node.
        def two_pods() -> list[client.V1Pod] | None:
            pods = core.list_namespaced_pod(ns, label_selector="app=probe").items
            return pods if len(pods) == 2 else None

        pods = eventually(two_pods, "the ReplicaSet controller to make 2 pods")
        assert all(p.status.phase == "Pending" and not p.spec.node_name for p in pods)

        # Garbage collection follows owner references (the operator relies on this).
        apps.delete_namespaced_deployment("probe", ns)

        def gone() -> bool | None:
            return True if not apps.list_namespaced_replica_set(ns).items else None

        eventually(gone, "the garbage collector to delete the ReplicaSet")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_running_kube_stops_every_process(kube_bin_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "cluster"
    with running_kube(workdir) as kube:
        pids = kube.pids
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert all(_alive(pid) for pid in pids.values())
        assert kube.ready_s is not None and kube.ready_s > 0
        assert stat.S_IMODE(kube.kubeconfig.stat().st_mode) == 0o600
    assert not any(_alive(pid) for pid in pids.values())
    assert kube.pids == {}
    # A workdir we passed in is kept, with the logs.
    assert kube.logs["kube-apiserver"].stat().st_size > 0


def test_a_process_that_dies_at_start_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("etcd", "kube-apiserver", "kube-controller-manager"):
        script = bindir / tool
        script.write_text(
            f"#!/bin/sh\necho '{tool}: cannot start: broken on purpose' >&2\nexit 3\n"
        )
        script.chmod(0o755)
    cluster = KubeCluster(tmp_path / "work", bin_dir=bindir)
    with pytest.raises(KubeStartError, match="(?s)etcd exited with status 3.*broken on purpose"):
        cluster.start(timeout_s=30)
    assert cluster.pids == {}


def test_missing_binaries_name_the_build_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOVEAL_K8S_CACHE", str(tmp_path / "empty-cache"))
    assert kube_mod.find_kube_bin() is None
    with pytest.raises(KubeBinariesNotFound, match="scripts/k8s-build.sh"):
        KubeCluster()
