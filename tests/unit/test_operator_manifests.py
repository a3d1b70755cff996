"""What the operator creates for a ModelPool, as plain data (validated against the k8s schemas)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from foveal.api.crds import ModelPoolSpec
from foveal.operator import manifests as m

UID = "2f0c7a4e-1111-2222-3333-444455556666"


def spec(**over: Any) -> ModelPoolSpec:
    base: dict[str, Any] = {
        "tier": "t16",
        "visualTokens": 16,
        "backend": "reference",
        "image": "foveal:dev",
        "mechanism": "pool",
    }
    return ModelPoolSpec.model_validate({**base, **over})


def test_deployment_for_the_reference_backend() -> None:
    s = spec(
        replicas=2,
        maxReplicas=4,
        resources={"limits": {"cpu": "2", "memory": "4Gi"}},
        nodeSelector={"pool": "cpu"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "vlm"}],
    )
    dep = m.deployment("t16", "demo", UID, s)
    assert dep["metadata"]["name"] == "foveal-pool-t16"
    assert dep["metadata"]["namespace"] == "demo"
    assert dep["metadata"]["labels"] == {
        "app.kubernetes.io/name": "foveal-pool",
        "app.kubernetes.io/instance": "t16",
        "foveal.io/tier": "t16",
        "app.kubernetes.io/managed-by": "foveal-operator",
    }
    assert dep["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "foveal.io/v1alpha1",
            "kind": "ModelPool",
            "name": "t16",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert dep["spec"]["replicas"] == 2
    # the selector only uses labels that never change (a selector is immutable)
    assert dep["spec"]["selector"]["matchLabels"] == m.selector_labels("t16")
    assert "foveal.io/tier" not in dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "foveal", "pool", "serve", "--tier", "t16", "--mechanism", "pool",
        "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert container["image"] == "foveal:dev"
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"] == {"limits": {"cpu": "2", "memory": "4Gi"}}
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "vlm"}]
    assert dep["spec"]["template"]["metadata"]["labels"]["foveal.io/tier"] == "t16"
    kubernetes_validate.validate(dep, "1.25.0", strict=True)


def test_vllm_command_carries_the_tier_budget() -> None:
    s = spec(
        backend="vllm",
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        visualTokens=256,
        port=8080,
        backendArgs={"limitMmPerPrompt": 2, "extraArgs": ["--max-model-len", "8192"]},
    )
    cmd = m.container_command(s)
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert cmd[cmd.index("--port") + 1] == "8080"
    assert cmd[cmd.index("--served-model-name") + 1] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert json.loads(cmd[cmd.index("--mm-processor-kwargs") + 1]) == {
        "max_pixels": 256 * 784,
        "min_pixels": 3136,
    }
    assert json.loads(cmd[cmd.index("--limit-mm-per-prompt") + 1]) == {"image": 2}
    assert cmd[-2:] == ["--max-model-len", "8192"]
    explicit = spec(backend="vllm", backendArgs={"maxPixels": 1003520})
    kwargs = m.container_command(explicit)
    assert json.loads(kwargs[kwargs.index("--mm-processor-kwargs") + 1]) == {
        "max_pixels": 1003520,
        "min_pixels": 3136,
    }
    dep = m.deployment("big", "demo", UID, s)
    startup = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # weights load slowly


def test_optional_pod_fields_are_omitted_when_unset() -> None:
    dep = m.deployment("t16", "demo", UID, spec())
    pod = dep["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "resources" not in pod["containers"][0]


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({}, 1),  # replicas unset: minReplicas (default 1)
        ({"minReplicas": 0}, 0),
        ({"minReplicas": 0, "replicas": 3, "maxReplicas": 5}, 3),
        ({"replicas": 9, "maxReplicas": 5}, 5),  # clamped to max
        ({"replicas": 0, "minReplicas": 2, "maxReplicas": 5}, 2),  # clamped to min
    ],
)
def test_target_replicas(over: dict[str, Any], expected: int) -> None:
    s = spec(**over)
    assert m.target_replicas(s) == expected
    assert m.deployment("t16", "demo", UID, s)["spec"]["replicas"] == expected


def test_service_and_endpoints() -> None:
    s = spec(port=9000)
    svc = m.service("t16", "demo", UID, s)
    assert svc["metadata"]["name"] == "foveal-pool-t16"
    assert svc["spec"]["selector"] == m.selector_labels("t16")
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 9000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert svc["metadata"]["ownerReferences"][0]["controller"] is True
    assert m.endpoints("t16", "demo", s) == ["http://foveal-pool-t16.demo.svc:9000"]
    kubernetes_validate.validate(svc, "1.25.0", strict=True)


def test_pdb_only_for_more_than_one_replica() -> None:
    assert not m.needs_pdb(0) and not m.needs_pdb(1) and m.needs_pdb(2)
    pdb = m.pod_disruption_budget("t16", "demo", UID, spec(), m.PDB_V1)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": m.selector_labels("t16")},
    }
    kubernetes_validate.validate(pdb, "1.25.0", strict=True)
    legacy = m.pod_disruption_budget("t16", "demo", UID, spec(), m.PDB_V1BETA1)
    assert legacy["apiVersion"] == "policy/v1beta1" and legacy["spec"] == pdb["spec"]


def test_pdb_api_version_from_discovery() -> None:
    assert m.pdb_api_version(["policy/v1beta1"]) == "policy/v1beta1"  # Kubernetes 1.20
    assert m.pdb_api_version(["policy/v1", "policy/v1beta1"]) == "policy/v1"  # 1.21 - 1.24
    assert m.pdb_api_version(["policy/v1"]) == "policy/v1"  # 1.25+
    assert m.pdb_api_version(["v1"]) == "policy/v1"
    assert m.pdb_api_version([]) == "policy/v1beta1"


def test_selector_string_is_the_scale_selector() -> None:
    assert m.selector_string("t16") == (
        "app.kubernetes.io/instance=t16,app.kubernetes.io/name=foveal-pool"
    )


def test_names_that_cannot_name_a_service_are_reported() -> None:
    assert m.name_problems("t16") == []
    assert m.name_problems("a" * 51) == []
    (too_long,) = m.name_problems("a" * 52)
    assert "at most 51" in too_long
    (dotted,) = m.name_problems("t16.v2")
    assert "DNS-1035" in dotted
