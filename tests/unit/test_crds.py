"""The CRDs: generated from the pydantic models, committed without drift, structural for
Kubernetes 1.20, and the models give clear errors that name the bad field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from foveal.api import crds
from foveal.api.crds import (
    CrdValidationError,
    ModelPool,
    ModelPoolSpec,
    RoutingPolicy,
    RoutingPolicySpec,
    ScalingSpec,
)
from foveal.cli import app

ROOT = Path(__file__).resolve().parents[2]

POOL = {
    "apiVersion": "foveal.io/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "t16", "namespace": "demo"},
    "spec": {"tier": "t16", "visualTokens": 16, "backend": "reference", "image": "foveal:dev"},
}


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "<root>", schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def _schema(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ------------------------------------------------------------------------------- drift


def test_committed_crds_match_the_models() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "foveal.api.crds", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"CRDs drifted (run `python -m foveal.api.crds`):\n{proc.stdout}"


def test_check_reports_a_hand_edited_crd_and_writes_nothing(tmp_path: Path) -> None:
    for rel in crds.CRD_FILES.values():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    edited = tmp_path / crds.CRD_FILES["modelpools"]
    edited.write_text(edited.read_text().replace("minimum: 1", "minimum: 2", 1))

    assert crds.main(["--check", "--root", str(tmp_path)]) == 1
    assert "minimum: 2" in edited.read_text()  # --check never writes
    assert crds.check(tmp_path) == [crds.CRD_FILES["modelpools"]]

    assert crds.write(tmp_path) == [crds.CRD_FILES["modelpools"]]
    assert crds.main(["--check", "--root", str(tmp_path)]) == 0


def test_cli_prints_both_crds_for_kubectl_apply() -> None:
    result = CliRunner().invoke(app, ["operator", "crds"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.output))
    assert [d["metadata"]["name"] for d in docs] == [
        "modelpools.foveal.io",
        "routingpolicies.foveal.io",
    ]
    assert docs == list(crds.crd_documents().values())


# -------------------------------------------------------------------------- structural


@pytest.mark.parametrize("plural", ["modelpools", "routingpolicies"])
def test_schema_is_structural_for_kubernetes_1_20(plural: str) -> None:
    committed = yaml.safe_load((ROOT / crds.CRD_FILES[plural]).read_text())
    schema = _schema(committed)
    for path, node in _nodes(schema):
        assert "type" in node, f"{plural}{path}: every node needs a type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "not", "title", "$defs"):
            assert banned not in node, f"{plural}{path}: {banned} is not structural"
        assert "x-kubernetes-validations" not in node, f"{plural}{path}: CEL needs k8s 1.25"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "object" and path not in ("<root>", ".metadata"):
            typed = "properties" in node or "additionalProperties" in node
            assert typed or node.get("x-kubernetes-preserve-unknown-fields"), (
                f"{plural}{path}: an object needs properties, additionalProperties or "
                "x-kubernetes-preserve-unknown-fields"
            )
        if node["type"] == "array":
            assert "items" in node, f"{plural}{path}: arrays need items"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node  # OpenAPI 3.0 form
    assert schema["properties"]["metadata"] == {"type": "object"}
    for path, node in _nodes(schema["properties"]["status"]):
        assert "default" not in node, f"status{path}: no defaults in status"


def test_crds_validate_against_the_apiextensions_schema() -> None:
    for doc in crds.crd_documents().values():
        kubernetes_validate.validate(doc, "1.25.0", strict=True)


def test_model_pool_crd_names_subresources_and_columns() -> None:
    doc = crds.model_pool_crd()
    assert doc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    names = doc["spec"]["names"]
    assert (names["plural"], names["shortNames"], names["categories"]) == (
        "modelpools",
        ["mp"],
        ["foveal"],
    )
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Tier": ".spec.tier",
        "Tokens": ".spec.visualTokens",
        "Backend": ".spec.backend",
        "Desired": ".spec.replicas",
        "Ready": ".status.readyReplicas",
        "Age": ".metadata.creationTimestamp",
    }
    spec = _schema(doc)["properties"]["spec"]
    assert spec["required"] == ["tier", "visualTokens", "backend", "image"]
    props = spec["properties"]
    assert props["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["tolerations"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert props["backend"]["enum"] == ["reference", "vllm"]
    assert props["mechanism"]["enum"] == ["resolution", "pool", "cls-topk", "kcenter"]
    conditions = _schema(doc)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_routing_policy_crd() -> None:
    doc = crds.routing_policy_crd()
    assert doc["spec"]["names"]["shortNames"] == ["rp"]
    assert doc["spec"]["versions"][0]["subresources"] == {"status": {}}
    props = _schema(doc)["properties"]["spec"]["properties"]
    assert props["qualityFloor"]["minimum"] == 0 and props["qualityFloor"]["maximum"] == 1
    assert props["gpuSecondsBudget"]["properties"]["seconds"]["exclusiveMinimum"] is True
    assert props["exploration"]["properties"]["algorithm"]["enum"] == ["none", "linucb", "thompson"]
    status = _schema(doc)["properties"]["status"]["properties"]
    assert status["accepted"] == {"type": "boolean"}


def test_crd_defaults_equal_the_model_defaults() -> None:
    """The API server fills the same defaults the Python models assume."""
    props = _schema(crds.model_pool_crd())["properties"]["spec"]["properties"]
    scaling = {k: v["default"] for k, v in props["scaling"]["properties"].items() if "default" in v}
    assert scaling == ScalingSpec().to_wire()
    assert props["scaling"]["default"] == {} and props["backendArgs"]["default"] == {}
    spec = ModelPoolSpec.model_validate(POOL["spec"])
    for name in ("model", "mechanism", "port", "minReplicas", "costPerReplicaHour"):
        assert props[name]["default"] == spec.to_wire()[name], name


# ------------------------------------------------------------------------------ models


def test_model_pool_parses_camel_case_and_fills_defaults() -> None:
    pool = ModelPool.from_object(POOL)
    assert pool.spec.visual_tokens == 16
    assert pool.spec.model == "foveal-ref" and pool.spec.port == 8000
    assert pool.spec.scaling.scale_down_stabilization_seconds == 300
    assert pool.spec.effective_max_replicas == 1
    assert pool.spec.effective_max_pixels == 16 * 28 * 28
    assert pool.status.ready_replicas == 0 and pool.serving_endpoints == []
    # snake_case works too (populate_by_name), and unknown fields are ignored
    spec = ModelPoolSpec.model_validate(
        {**POOL["spec"], "visual_tokens": 4, "visualTokens": 4, "somethingNew": 1}
    )
    assert spec.visual_tokens == 4


def test_serving_endpoints_only_while_a_replica_is_ready() -> None:
    status = {"endpoints": ["http://foveal-pool-t16.demo.svc:8000"], "readyReplicas": 0}
    assert ModelPool.from_object({**POOL, "status": status}).serving_endpoints == []
    status["readyReplicas"] = 2
    assert ModelPool.from_object({**POOL, "status": status}).serving_endpoints == [
        "http://foveal-pool-t16.demo.svc:8000"
    ]


def test_model_pool_errors_name_every_bad_field() -> None:
    bad = {
        **POOL,
        "spec": {
            "tier": "T_16",
            "visualTokens": 0,
            "backend": "triton",
            "scaling": {"targetInFlightPerReplica": 0},
        },
    }
    with pytest.raises(CrdValidationError) as err:
        ModelPool.from_object(bad)
    text = str(err.value)
    assert text.startswith("invalid ModelPool demo/t16: ")
    for field in (
        "spec.tier",
        "spec.visualTokens",
        "spec.backend",
        "spec.image: Field required",
        "spec.scaling.targetInFlightPerReplica",
    ):
        assert field in text, field
    assert len(err.value.problems) == 5


def test_cross_field_problems_are_reported_not_raised() -> None:
    spec = ModelPoolSpec.model_validate({**POOL["spec"], "minReplicas": 3, "maxReplicas": 2})
    assert spec.problems() == ["spec.maxReplicas (2) must be >= spec.minReplicas (3)"]
    ok = ModelPoolSpec.model_validate({**POOL["spec"], "minReplicas": 3})
    assert ok.problems() == [] and ok.effective_max_replicas == 3
    zero = ModelPoolSpec.model_validate({**POOL["spec"], "minReplicas": 0})
    assert zero.effective_max_replicas == 1


def test_routing_policy_validation() -> None:
    meta = {"name": "gold", "namespace": "demo"}
    policy = RoutingPolicy.from_object(
        {
            "metadata": meta,
            "spec": {
                "tenants": ["acme"],
                "qualityWeight": 0.5,
                "gpuSecondsBudget": {"seconds": 3600, "period": "day"},
                "exploration": {"algorithm": "linucb", "rate": 0.1},
            },
        }
    )
    assert policy.spec.quality_weight == 0.5 and policy.spec.allowed_tiers == []
    assert policy.spec.gpu_seconds_budget is not None
    assert policy.spec.gpu_seconds_budget.period == "day"
    with pytest.raises(CrdValidationError) as err:
        RoutingPolicy.from_object(
            {
                "metadata": meta,
                "spec": {
                    "tenants": [],
                    "qualityFloor": 1.5,
                    "allowedTiers": ["T1"],
                    "gpuSecondsBudget": {"seconds": 0, "period": "week"},
                },
            }
        )
    text = str(err.value)
    for field in (
        "spec.tenants",
        "spec.qualityFloor",
        "spec.allowedTiers.0",
        "spec.gpuSecondsBudget.seconds",
        "spec.gpuSecondsBudget.period",
    ):
        assert field in text, field
    assert RoutingPolicySpec.model_validate({"tenants": ["*"]}).quality_floor == 0.0
