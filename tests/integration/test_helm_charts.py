"""The Helm charts, linted and rendered by the real Helm v4 engine (``helm_python``).

No cluster is involved: the rendered objects are checked against what their consumers accept —
the router's settings model reads the ConfigMap's file with the Deployment's environment, the
ModelPool models and generated CRD schema read the pools, the ``foveal`` CLI parses the
containers' commands, Kubernetes' own JSON schemas (``kubernetes_validate``) read every built-in
object, and the dashboard may only name metrics that ``foveal.metrics`` exports.
(``tests/e2e/test_helm_install.py`` installs the charts into a real API server.)
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native
from prometheus_client.metrics import MetricWrapperBase
from typer.main import get_command

from foveal import metrics
from foveal.api.crds import CRD_FILES, ModelPool, crd_documents
from foveal.cli import app
from foveal.config import load_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "foveal"
CRDS_CHART = REPO / "helm" / "foveal-crds"
RELEASE = "foveal"
NAMESPACE = "ml"
# The oldest Kubernetes whose schemas kubernetes_validate ships (it has none for 1.20; the
# e2e test checks the 1.20 API server itself).
VALIDATE_K8S = "1.25.0"

# Secret values the production render refers to (what the kubelet would inject).
SECRETS = {
    ("foveal-store", "url"): "postgresql+psycopg://foveal:s3cret@db.ml.svc:5432/foveal",
    ("foveal-feedback", "secret"): "0123456789abcdef0123456789abcdef",
}

# A realistic override: HA routers on PostgreSQL, auth on, GPU vLLM tiers, monitoring.
PRODUCTION: dict[str, Any] = {
    "router": {
        "replicas": 3,
        "httpPort": 9000,
        "grpcPort": 9001,
        "image": {"repository": "registry.example.com/foveal/router", "tag": "0.1.0-rc1"},
        "storeUrlSecret": {"name": "foveal-store", "key": "url"},
        "feedbackSecret": {"name": "foveal-feedback", "key": "secret"},
        "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "extraEnv": [{"name": "OTEL_SERVICE_NAME", "value": "foveal-router"}],
    },
    "operator": {
        "scaleIntervalSeconds": 10,
        "logLevel": "DEBUG",
        "extraRouterMetrics": ["http://edge-router.edge.svc:8080/metrics"],
    },
    "config": {
        "auth": {"enabled": True, "key_cache_ttl_s": 10},
        "limits": {"max_images": 4, "max_tokens_cap": 2048},
        "image_urls": {"enabled": True, "allowed_hosts": ["*.example.com"]},
        "pool_client": {"request_timeout_s": 120, "fallback": True},
        "policy": {"name": "rules", "small_image_pixels": 50000},
        "log_level": "DEBUG",
    },
    "pools": {
        "t1": None,  # null removes a default tier
        "t4": {"enabled": False},
        "t16": {"mechanism": "pool", "minReplicas": 2, "maxReplicas": 6},
        "t64": {
            "backend": "vllm",
            "model": "Qwen/Qwen2-VL-7B-Instruct",
            "maxReplicas": 4,
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "costPerReplicaHour": 0.8,
        },
        "t256": {
            "backend": "vllm",
            "model": "Qwen/Qwen2-VL-7B-Instruct",
            "image": "registry.example.com/vllm-openai:v0.8.5-patched",
            "backendArgs": {"maxPixels": 250000, "extraArgs": ["--max-model-len", "8192"]},
            "scaling": {"targetInFlightPerReplica": 8, "ttftObjectiveSeconds": 1.5},
        },
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
}


# ------------------------------------------------------------------------------------ helpers


def render(
    chart_dir: Path,
    values: Mapping[str, Any] | None = None,
    *,
    kube_version: str | None = None,
) -> list[dict[str, Any]]:
    """The chart's objects for an install of RELEASE into NAMESPACE (NOTES.txt left out).

    ``Chart.render`` does not expose the engine's kube_version option, so a render for a given
    Kubernetes version calls the same native entry point with it (the options the library's
    ``helm_render`` decodes: name, namespace, is_install, kube_version, api_versions, ...).
    """
    opts: dict[str, Any] = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    with helm.Chart.load(chart_dir) as chart:
        if kube_version is None:
            files = chart.render(dict(values or {}), **opts)
        else:
            opts["kube_version"] = kube_version
            files = json.loads(
                _native.call_string(
                    "helm_render", chart._raw(), json.dumps(dict(values or {})), json.dumps(opts)
                )
            )
    objects: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render_error(values: Mapping[str, Any]) -> str:
    """The message with which the engine refuses ``values`` (the test fails if it renders)."""
    with helm.Chart.load(CHART) as chart:
        with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as info:
            chart.render(dict(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(info.value)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def parse_cli(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a container command with the real ``foveal`` CLI: (command path, its params)."""
    assert argv[0] == "foveal", argv
    cmd: Any = get_command(app)  # typer vendors click: test for a group by its interface
    ctx = cmd.make_context("foveal", list(argv[1:]))
    path = []
    while hasattr(cmd, "resolve_command"):
        name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None, f"unknown command {name!r} in {argv}"
        path.append(str(name))
        ctx = sub.make_context(str(name), rest, parent=ctx)
        cmd = sub
    return " ".join(path), dict(ctx.params)


def container_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would set it (secrets from SECRETS)."""
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = SECRETS[(ref["name"], ref["key"])]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = NAMESPACE
    return env


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of a Role/ClusterRole."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render(CHART)


@pytest.fixture(scope="module")
def production_objects() -> list[dict[str, Any]]:
    return render(CHART, PRODUCTION)


# -------------------------------------------------------------------------------- lint, schema


@pytest.mark.parametrize("chart", [CHART, CRDS_CHART], ids=["foveal", "foveal-crds"])
def test_charts_pass_strict_lint(chart: Path) -> None:
    report = helm.lint(chart, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == [], report


def test_strict_lint_also_passes_with_the_production_values() -> None:
    report = helm.lint(CHART, values=PRODUCTION, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report


def test_values_schema_carries_the_current_settings_schema() -> None:
    """values.schema.json embeds foveal.config.Settings' schema; it must not drift."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "helm_config_schema.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


BAD_VALUES = [
    pytest.param({"router": {"replicas": -1}}, ["/router/replicas", "minimum"], id="negative"),
    pytest.param(
        {"pools": {"t16": {"backend": "triton"}}},
        ["/pools/t16/backend", "reference", "vllm"],
        id="unknown-backend",
    ),
    pytest.param(
        {"pools": {"t32": {"backend": "reference"}}},
        ["/pools/t32", "missing property 'visualTokens'"],
        id="tier-without-visualTokens",
    ),
    pytest.param(
        {"router": {"http_port": 8081}},
        ["/router", "additional properties 'http_port' not allowed"],
        id="snake-case-typo",
    ),
    pytest.param(
        {"operater": {"enabled": False}},
        ["additional properties 'operater' not allowed"],
        id="top-level-typo",
    ),
    pytest.param(
        {"pools": {"T16": {"visualTokens": 16}}},
        ["at '/pools': additional properties 'T16' not allowed", "does not match pattern"],
        id="tier-not-a-dns-label",
    ),
    pytest.param(
        {"pools": {"auto": {"visualTokens": 16}}},
        ["pools.auto: `auto` is the model name that lets Foveal choose"],
        id="tier-auto",
    ),
    pytest.param(
        {"config": {"gatway": {"port": 1}}},
        ["/config", "additional properties 'gatway' not allowed"],
        id="config-typo",
    ),
    pytest.param(
        {"config": {"store": {"batch_max": 0}}},
        ["/config/store/batch_max", "minimum"],
        id="config-out-of-range",
    ),
    pytest.param(
        {"config": {"log_format": "xml"}}, ["/config/log_format", "text", "json"], id="config-enum"
    ),
    pytest.param(
        {"pools": {"t16": {"minReplicas": 3, "maxReplicas": 2}}},
        ["pools.t16: minReplicas (3) is greater than maxReplicas (2)"],
        id="min-above-max",
    ),
    pytest.param(
        {"router": {"replicas": 2}},
        ["router.replicas is 2 but the store is SQLite", "PostgreSQL"],
        id="ha-on-sqlite",
    ),
    pytest.param(
        {"config": {"gateway": {"port": 8081}}},
        ["config.gateway.host/port are set by the chart (router.httpPort"],
        id="config-port",
    ),
    pytest.param(
        {"pools": {"t64": {"backend": "vllm"}}},
        ["pools.t64: backend vllm needs `model`"],
        id="vllm-without-model",
    ),
    pytest.param(
        {"pools": {"t64": {"backend": "vllm", "model": "m", "mechanism": "kcenter"}}},
        ['pools.t64: mechanism "kcenter" applies to the reference backend only'],
        id="vllm-mechanism",
    ),
    pytest.param(
        {"pools": {"t16": {"minReplicas": 0}}},
        ["every pool has minReplicas 0", "/readyz"],
        id="every-tier-cold",
    ),
    pytest.param(
        {"router": {"httpPort": 9000, "grpcPort": 9000}},
        ["router.httpPort and router.grpcPort are both 9000"],
        id="same-ports",
    ),
]


@pytest.mark.parametrize(("values", "expected"), BAD_VALUES)
def test_bad_values_fail_with_a_message_naming_the_value(
    values: dict[str, Any], expected: list[str]
) -> None:
    message = render_error(values)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ------------------------------------------------------------------------ router and config


@pytest.mark.parametrize("values", [{}, PRODUCTION], ids=["defaults", "production"])
def test_router_runs_the_rendered_config_with_its_environment(
    values: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pod would do: the CLI parses the command, and the settings model accepts the
    mounted config file plus the container's environment, binding the container's ports."""
    objects = render(CHART, values)
    deployment = one(objects, "Deployment", "foveal-router")
    router = container(deployment, "router")

    command, params = parse_cli(router["command"] + router.get("args", []))
    assert command == "router serve"
    config_path = Path(params["config"])
    assert config_path == Path("/etc/foveal/config.yaml")

    # The file is the ConfigMap's key, mounted where the command reads it.
    mount = next(m for m in router["volumeMounts"] if m["name"] == "config")
    assert Path(mount["mountPath"]) / "config.yaml" == config_path
    volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    configmap = one(objects, "ConfigMap", volume["configMap"]["name"])
    config_text = configmap["data"][config_path.name]
    assert yaml.safe_load(config_text) == deep_merge(
        helm.Chart.load(CHART).values["config"], values.get("config", {})
    )
    local = tmp_path / "config.yaml"
    local.write_text(config_text)

    for name in [n for n in os.environ if n.startswith("FOVEAL_")]:
        monkeypatch.delenv(name)
    for name, value in container_env(router).items():
        monkeypatch.setenv(name, value)
    settings = load_settings(local)

    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert (settings.gateway.host, settings.gateway.port) == ("0.0.0.0", ports["http"])
    assert (settings.grpc.host, settings.grpc.port) == ("0.0.0.0", ports["grpc"])
    assert settings.catalog.source == "kubernetes"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert router[probe]["httpGet"]["port"] == "http"
    assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if values is PRODUCTION:
        assert settings.store.url == SECRETS[("foveal-store", "url")]
        assert settings.auth.feedback_secret == SECRETS[("foveal-feedback", "secret")]
        assert settings.auth.enabled and settings.limits.max_images == 4
        assert settings.log_level == "DEBUG"
        assert router["image"] == "registry.example.com/foveal/router:0.1.0-rc1"
        assert deployment["spec"]["replicas"] == 3
    else:
        # SQLite on the data volume (writable, unlike the read-only root file system).
        assert settings.store.url == "sqlite:////var/lib/foveal/foveal.db"
        data = next(m for m in router["volumeMounts"] if m["name"] == "data")
        assert data["mountPath"] == "/var/lib/foveal"
        assert router["securityContext"]["readOnlyRootFilesystem"] is True
        assert router["image"] == f"foveal/router:{helm.Chart.load(CHART).metadata['appVersion']}"


def test_config_change_rolls_the_router_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(render(CHART, values), "Deployment", "foveal-router")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"log_level": "DEBUG"}})


@pytest.mark.parametrize("values", [{}, PRODUCTION], ids=["defaults", "production"])
def test_operator_command_parses_and_reads_the_router_service(values: dict[str, Any]) -> None:
    objects = render(CHART, values)
    deployment = one(objects, "Deployment", "foveal-operator")
    operator = container(deployment, "operator")
    command, params = parse_cli(operator["command"] + operator.get("args", []))
    assert command == "operator run"
    assert list(params["namespace"]) == [NAMESPACE] and not params["all_namespaces"]
    assert params["log_level"] == values.get("operator", {}).get("logLevel", "INFO")
    # The first URL is the chart's own router Service, on the port it exposes /metrics on.
    service = one(objects, "Service", "foveal-router")
    port = next(p for p in service["spec"]["ports"] if p["name"] == "http")["port"]
    urls = list(params["router_metrics"])
    assert urls[0] == f"http://foveal-router.{NAMESPACE}.svc:{port}/metrics"
    assert urls[1:] == values.get("operator", {}).get("extraRouterMetrics", [])
    assert params["scale_interval"] == values.get("operator", {}).get("scaleIntervalSeconds", 15)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_operator_can_be_left_out() -> None:
    objects = render(CHART, {"operator": {"enabled": False}})
    assert "foveal-operator" not in by_kind(objects, "Deployment")
    assert "foveal-operator" not in by_kind(objects, "ServiceAccount")
    assert "foveal-operator" not in by_kind(objects, "Role")
    assert "foveal-router" in by_kind(objects, "Deployment")


# ---------------------------------------------------------------------------------- pools


def _crd_schema(plural: str) -> dict[str, Any]:
    """The generated CRD's openAPIV3Schema, closed: Kubernetes silently prunes fields its
    schema does not declare, so a field the chart misspells must fail here instead."""
    path = REPO / CRD_FILES[plural]
    crd = yaml.safe_load(path.read_text()) if path.exists() else crd_documents()[plural]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: close(v) for k, v in node.items()}
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node.setdefault("additionalProperties", False)
            return node
        if isinstance(node, list):
            return [close(v) for v in node]
        return node

    closed = close(schema)
    closed["properties"]["metadata"] = {"type": "object"}
    return closed


def test_every_default_pool_becomes_a_valid_model_pool(
    default_objects: list[dict[str, Any]],
) -> None:
    values = helm.Chart.load(CHART).values
    pools = by_kind(default_objects, "ModelPool")
    assert set(pools) == set(values["pools"]) == {"t1", "t4", "t16", "t64", "t256"}
    validator = jsonschema.Draft4Validator(_crd_schema("modelpools"))  # OpenAPI 3.0 bounds
    for tier, obj in pools.items():
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(obj)]
        assert errors == [], (tier, errors)
        pool = ModelPool.from_object(obj)
        assert pool.spec.problems() == []
        assert pool.metadata.namespace == NAMESPACE
        assert obj["metadata"]["labels"]["foveal.io/tier"] == tier
        spec = pool.spec
        assert (spec.tier, spec.visual_tokens) == (tier, values["pools"][tier]["visualTokens"])
        assert (spec.backend, spec.mechanism, spec.model) == (
            "reference",
            "resolution",
            "foveal-ref",
        )
        assert spec.image == f"foveal/pool:{helm.Chart.load(CHART).metadata['appVersion']}"
        assert spec.min_replicas == (1 if tier == "t16" else 0)
        assert spec.max_replicas == 2
        # The operator owns spec.replicas (scale subresource); an upgrade must not reset it.
        assert "replicas" not in obj["spec"]


def test_production_pools_carry_their_overrides(production_objects: list[dict[str, Any]]) -> None:
    pools = {
        name: ModelPool.from_object(o)
        for name, o in by_kind(production_objects, "ModelPool").items()
    }
    assert set(pools) == {"t16", "t64", "t256"}  # t1 removed with null, t4 disabled
    validator = jsonschema.Draft4Validator(_crd_schema("modelpools"))
    for obj in by_kind(production_objects, "ModelPool").values():
        assert [e.message for e in validator.iter_errors(obj)] == []
    assert all(p.spec.problems() == [] for p in pools.values())

    t16 = pools["t16"].spec
    assert (t16.mechanism, t16.min_replicas, t16.max_replicas) == ("pool", 2, 6)
    assert t16.resources == {"requests": {"cpu": "1", "memory": "2Gi"}}

    t64 = pools["t64"].spec
    assert (t64.backend, t64.model, t64.max_replicas) == ("vllm", "Qwen/Qwen2-VL-7B-Instruct", 4)
    assert t64.image == "vllm/vllm-openai:v0.8.5"
    # vLLM reads max_pixels; one visual token per 28x28 pixels.
    assert t64.backend_args.max_pixels == 64 * 28 * 28
    assert t64.backend_args.limit_mm_per_prompt == 1
    # Pool keys deep-merge over poolDefaults: the GPU limit joins the default requests.
    assert t64.resources == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"nvidia.com/gpu": 1},
    }
    assert t64.node_selector == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert t64.tolerations == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert t64.cost_per_replica_hour == 0.8

    t256 = pools["t256"].spec
    assert t256.image == "registry.example.com/vllm-openai:v0.8.5-patched"
    assert t256.backend_args.max_pixels == 250000
    assert t256.backend_args.extra_args == ["--max-model-len", "8192"]
    assert t256.scaling.target_in_flight_per_replica == 8
    assert t256.scaling.ttft_objective_seconds == 1.5
    assert t256.scaling.scale_down_stabilization_seconds == 300  # from poolDefaults


# ----------------------------------------------------------------------------------- RBAC

ROUTER_RULES = {
    ("foveal.io", "modelpools"): {"get", "list", "watch"},
    ("foveal.io", "routingpolicies"): {"get", "list", "watch"},
}
# docs/operator.md's list, which the e2e test runs the operator under.
OPERATOR_RULES = {
    ("foveal.io", "modelpools"): {"get", "list", "watch", "patch"},
    ("foveal.io", "routingpolicies"): {"get", "list", "watch", "patch"},
    ("foveal.io", "modelpools/status"): {"patch"},
    ("foveal.io", "modelpools/scale"): {"patch"},
    ("foveal.io", "routingpolicies/status"): {"patch"},
    ("apps", "deployments"): {"list", "watch", "create", "patch"},
    ("", "services"): {"create", "patch"},
    ("policy", "poddisruptionbudgets"): {"create", "patch", "delete"},
    ("", "events"): {"create"},
}


def _bound_account(objects: list[dict[str, Any]], kind: str, role: str) -> str:
    binding = one(objects, kind, role)
    assert binding["roleRef"]["name"] == role
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
    return str(subject["name"])


def test_rbac_is_the_minimum_each_component_needs(default_objects: list[dict[str, Any]]) -> None:
    assert by_kind(default_objects, "ClusterRole") == {}
    assert by_kind(default_objects, "ClusterRoleBinding") == {}
    roles = by_kind(default_objects, "Role")
    assert rules(roles["foveal-router"]) == ROUTER_RULES
    assert rules(roles["foveal-operator"]) == OPERATOR_RULES
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule

    # Each binding gives its role to the account the component's pods run as.
    deployments = by_kind(default_objects, "Deployment")
    accounts = by_kind(default_objects, "ServiceAccount")
    for component in ("router", "operator"):
        name = f"foveal-{component}"
        account = _bound_account(default_objects, "RoleBinding", name)
        assert account in accounts
        assert deployments[name]["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_all_namespaces_operator_gets_a_cluster_role() -> None:
    objects = render(CHART, {"operator": {"allNamespaces": True}})
    operator = one(objects, "Deployment", "foveal-operator")
    command, params = parse_cli(container(operator, "operator")["command"])
    assert params["all_namespaces"] is True and not params["namespace"]
    name = f"{NAMESPACE}-foveal-operator"
    assert rules(one(objects, "ClusterRole", name)) == OPERATOR_RULES
    assert _bound_account(objects, "ClusterRoleBinding", name) == "foveal-operator"
    assert "foveal-operator" not in by_kind(objects, "Role")
    assert rules(one(objects, "Role", "foveal-router")) == ROUTER_RULES


# -------------------------------------------------------------- labels, selectors, monitoring


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("values", [{}, PRODUCTION], ids=["defaults", "production"])
def test_services_and_budgets_select_exactly_their_pods(values: dict[str, Any]) -> None:
    objects = render(CHART, values, kube_version="v1.25.0")
    deployments = by_kind(objects, "Deployment")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, d in deployments.items():
        assert _selects(d["spec"]["selector"]["matchLabels"], pod_labels[name])
        others = [o for o in deployments if o != name]
        assert not any(
            _selects(d["spec"]["selector"]["matchLabels"], pod_labels[o]) for o in others
        )
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    for name, service in by_kind(objects, "Service").items():
        chosen = [
            d for d, labels in pod_labels.items() if _selects(service["spec"]["selector"], labels)
        ]
        assert chosen == ["foveal-router"], (name, chosen)
        ports = {p["name"] for p in container(deployments["foveal-router"], "router")["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    budgets = by_kind(objects, "PodDisruptionBudget")
    if values is PRODUCTION:
        (budget,) = budgets.values()
        assert budget["apiVersion"] == "policy/v1"
        assert _selects(budget["spec"]["selector"]["matchLabels"], pod_labels["foveal-router"])
        assert not _selects(
            budget["spec"]["selector"]["matchLabels"], pod_labels["foveal-operator"]
        )
    else:
        assert budgets == {}  # one router replica: a budget would block every drain


def test_router_budget_uses_policy_v1beta1_on_kubernetes_1_20() -> None:
    objects = render(CHART, PRODUCTION, kube_version="v1.20.2")
    (budget,) = by_kind(objects, "PodDisruptionBudget").values()
    assert budget["apiVersion"] == "policy/v1beta1"


def test_service_monitor_only_when_enabled(
    default_objects: list[dict[str, Any]], production_objects: list[dict[str, Any]]
) -> None:
    assert by_kind(default_objects, "ServiceMonitor") == {}
    (monitor,) = by_kind(production_objects, "ServiceMonitor").values()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(production_objects, "Service", "foveal-router")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    grpc = one(production_objects, "Service", "foveal-router-grpc")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] not in {p["name"] for p in grpc["spec"]["ports"]}


def _exported_series() -> set[str]:
    """Every series name foveal.metrics can expose (counters as _total, histogram parts)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names: set[str] = set()
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        for family in obj.describe():
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def test_dashboard_charts_only_metrics_the_router_exports(
    default_objects: list[dict[str, Any]],
) -> None:
    configmap = one(default_objects, "ConfigMap", "foveal-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["foveal.json"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bfoveal_[a-z0-9_]+", e)}
    exported = _exported_series()
    assert used - exported == set(), f"the dashboard charts unknown metrics: {used - exported}"
    for wanted in (
        "foveal_router_requests_total",  # request rate by tier
        "foveal_router_request_duration_seconds_bucket",  # p50/p99 latency
        "foveal_gateway_overhead_seconds_bucket",
        "foveal_pool_errors_total",
        "foveal_pool_fallbacks_total",
        "foveal_pool_endpoints_available",
        "foveal_store_decisions_pending",
    ):
        assert wanted in used, wanted
    assert any("histogram_quantile(0.99" in e for e in exprs)
    assert any("histogram_quantile(0.5" in e for e in exprs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert dashboard["uid"] and all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert by_kind(render(CHART, {"grafanaDashboard": {"enabled": False}}), "ConfigMap").keys() == {
        "foveal-config"
    }


# ------------------------------------------------------------------- offline schema validation


def _validate_offline(objects: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Validate each object with Kubernetes' own JSON schemas; returns (checked, skipped)."""
    checked, skipped = [], []
    for obj in objects:
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, VALIDATE_K8S, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Custom kinds (ModelPool: checked against its CRD above; ServiceMonitor: the
            # Prometheus Operator's CRD is not vendored here).
            skipped.append(label)
            continue
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{label} is invalid for Kubernetes {VALIDATE_K8S}: {exc}")
        checked.append(label)
    return checked, skipped


@pytest.mark.parametrize("values", [{}, PRODUCTION], ids=["defaults", "production"])
def test_rendered_manifests_validate_against_kubernetes_schemas(values: dict[str, Any]) -> None:
    objects = render(CHART, values, kube_version=f"v{VALIDATE_K8S}")
    checked, skipped = _validate_offline(objects)
    assert {s.split("/")[0] for s in skipped} <= {"ModelPool", "ServiceMonitor"}, skipped
    kinds = {c.split("/")[0] for c in checked}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds


# ----------------------------------------------------------------------------- foveal-crds


def test_crds_chart_renders_the_generated_crds_and_keeps_them() -> None:
    objects = render(CRDS_CHART)
    crds = by_kind(objects, "CustomResourceDefinition")
    assert set(crds) == {"modelpools.foveal.io", "routingpolicies.foveal.io"}
    expected = {doc["metadata"]["name"]: doc for doc in crd_documents().values()}
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd == expected[name]
    assert [o["kind"] for o in objects] == ["CustomResourceDefinition"] * 2
    checked, skipped = _validate_offline(objects)
    assert skipped == [] and len(checked) == 2


# ------------------------------------------------------------------------------ Dockerfiles

DOCKERFILES = {
    "router": ("router", ["router", "serve"]),
    "operator": ("operator", ["operator", "run"]),
    "pool": ("pool", ["pool", "serve"]),
}


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, argument) pairs of the last build stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    steps = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_match_what_the_chart_runs(image: str) -> None:
    """The images cannot be built here; their contract with the chart and the operator is
    checked instead: `foveal` entrypoint, the component's extra installed with the
    constraints, and a numeric non-root user equal to the chart's runAsUser (Kubernetes can
    only verify runAsNonRoot for a numeric USER)."""
    dockerfile = REPO / "docker" / f"{image}.Dockerfile"
    extra, subcommand = DOCKERFILES[image]
    text = dockerfile.read_text()
    assert "pip install" in text and f"-c constraints.txt '.[{extra}]'" in text
    final = _final_stage(dockerfile)
    assert ("ENTRYPOINT", '["foveal"]') in final
    (user,) = [arg for op, arg in final if op == "USER"]
    values = helm.Chart.load(CHART).values
    uid = values["router"]["podSecurityContext"]["runAsUser"]
    assert user == f"{uid}:{uid}" and uid == values["operator"]["podSecurityContext"]["runAsUser"]
    (cmd,) = [json.loads(arg) for op, arg in final if op == "CMD"]
    assert cmd[:2] == subcommand
    if image == "router":
        objects = render(CHART)
        router = container(one(objects, "Deployment", "foveal-router"), "router")
        assert ["foveal", *cmd] == router["command"]
        exposed = {int(p) for op, arg in final if op == "EXPOSE" for p in arg.split()}
        assert exposed == {values["router"]["httpPort"], values["router"]["grpcPort"]}


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = {
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    copied = {"pyproject.toml", "constraints.txt", "README.md", "foveal"}
    assert not copied & ignored
    assert {".git", ".venv"} <= ignored
