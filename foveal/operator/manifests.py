"""What a ModelPool becomes in the cluster: pure functions from the spec to child objects.

Nothing here talks to the API server, so every rule (names, labels, the server command of each
backend, probes, the PodDisruptionBudget policy) is unit-tested as plain data. The handlers
apply these dicts with server-side apply, which makes re-applying the same dict a no-op and
removes fields that a newer spec no longer sets (a strategic merge patch would keep a deleted
``nodeSelector`` key forever).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from foveal.api.crds import API_VERSION, ModelPoolSpec
from foveal.pools.vllm import from_model_pool, serve_args

__all__ = [
    "CHILD_PREFIX",
    "CONTAINER_NAME",
    "MANAGED_BY",
    "PDB_V1",
    "PDB_V1BETA1",
    "child_name",
    "container_command",
    "deployment",
    "endpoints",
    "name_problems",
    "needs_pdb",
    "owner_reference",
    "pdb_api_version",
    "pod_disruption_budget",
    "pool_labels",
    "selector_labels",
    "selector_string",
    "service",
    "target_replicas",
]

MANAGED_BY = "foveal-operator"
CHILD_PREFIX = "foveal-pool-"
CONTAINER_NAME = "pool"
PORT_NAME = "http"
PDB_V1 = "policy/v1"
PDB_V1BETA1 = "policy/v1beta1"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TIER = "foveal.io/tier"

# Service names are DNS-1035 labels (<= 63 chars, start with a letter); the child name adds
# "foveal-pool-" (12 chars) in front of the ModelPool's name.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_POOL_NAME = 63 - len(CHILD_PREFIX)


def child_name(pool: str) -> str:
    """Name of the Deployment, Service and PodDisruptionBudget of ModelPool ``pool``."""
    return f"{CHILD_PREFIX}{pool}"


def name_problems(pool: str) -> list[str]:
    """Why ``pool`` cannot name the children (ModelPool names may be longer DNS subdomains)."""
    found = []
    if len(pool) > _MAX_POOL_NAME:
        found.append(
            f"metadata.name {pool!r} is {len(pool)} characters; at most {_MAX_POOL_NAME} fit in "
            f"the Service name {CHILD_PREFIX}<name>"
        )
    if not _DNS1035.match(child_name(pool)):
        found.append(
            f"metadata.name {pool!r} must consist of lower-case letters, digits and '-' "
            f"(the Service {child_name(pool)!r} must be a DNS-1035 label)"
        )
    return found


def selector_labels(pool: str) -> dict[str, str]:
    """The immutable Deployment selector: only labels that never change for a pool."""
    return {LABEL_NAME: "foveal-pool", LABEL_INSTANCE: pool}


def pool_labels(pool: str, tier: str) -> dict[str, str]:
    return {**selector_labels(pool), LABEL_TIER: tier, LABEL_MANAGED_BY: MANAGED_BY}


def selector_string(pool: str) -> str:
    """The selector in ``kubectl -l`` form, for the scale subresource (status.selector)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(pool).items()))


def owner_reference(pool: str, uid: str) -> dict[str, Any]:
    """Makes the ModelPool the controller of a child: the garbage collector deletes children
    with it, and ``blockOwnerDeletion`` keeps foreground deletion waiting for them."""
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelPool",
        "name": pool,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(pool: str, namespace: str, uid: str, spec: ModelPoolSpec) -> dict[str, Any]:
    return {
        "name": child_name(pool),
        "namespace": namespace,
        "labels": pool_labels(pool, spec.tier),
        "ownerReferences": [owner_reference(pool, uid)],
    }


def target_replicas(spec: ModelPoolSpec) -> int:
    """``spec.replicas`` (``minReplicas`` when unset) clamped to [minReplicas, maxReplicas]."""
    wanted = spec.replicas if spec.replicas is not None else spec.min_replicas
    return max(spec.min_replicas, min(wanted, spec.effective_max_replicas))


def container_command(spec: ModelPoolSpec) -> list[str]:
    """The server each backend runs; both serve OpenAI-compatible HTTP with GET /health."""
    if spec.backend == "reference":
        return [
            "foveal", "pool", "serve",
            "--tier", spec.tier,
            "--mechanism", spec.mechanism,
            "--host", "0.0.0.0",
            "--port", str(spec.port),
        ]  # fmt: skip
    # One mapping for every vLLM tier (max_pixels = tokens*28*28 and a min_pixels floor so t1
    # stays 1 token): the same function the docs and the router-side catalog use.
    return serve_args(from_model_pool(spec))


def _probe(*, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _container(spec: ModelPoolSpec) -> dict[str, Any]:
    # vLLM loads weights for minutes before /health answers: the startup probe allows 15
    # minutes so liveness does not kill a loading server; the reference server needs seconds.
    startup_failures = 90 if spec.backend == "vllm" else 30
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": container_command(spec),
        "ports": [{"name": PORT_NAME, "containerPort": spec.port, "protocol": "TCP"}],
        "startupProbe": _probe(period=10, failures=startup_failures),
        "readinessProbe": _probe(period=5, failures=3),
        "livenessProbe": _probe(period=10, failures=3),
    }
    if spec.resources:
        container["resources"] = dict(spec.resources)
    return container


def deployment(pool: str, namespace: str, uid: str, spec: ModelPoolSpec) -> dict[str, Any]:
    """The pool's Deployment; ``spec.replicas`` decides its size (clamped to min/max)."""
    pod_spec: dict[str, Any] = {"containers": [_container(spec)]}
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    labels = pool_labels(pool, spec.tier)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, namespace, uid, spec),
        "spec": {
            "replicas": target_replicas(spec),
            "selector": {"matchLabels": selector_labels(pool)},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service(pool: str, namespace: str, uid: str, spec: ModelPoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, namespace, uid, spec),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(pool),
            "ports": [
                {"name": PORT_NAME, "port": spec.port, "targetPort": PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


def endpoints(pool: str, namespace: str, spec: ModelPoolSpec) -> list[str]:
    """Base URLs routers send to (the Service's cluster DNS name)."""
    return [f"http://{child_name(pool)}.{namespace}.svc:{spec.port}"]


def needs_pdb(replicas: int) -> bool:
    """A PodDisruptionBudget only protects pools that can lose one pod and still serve."""
    return replicas > 1


def pdb_api_version(group_versions: Iterable[str]) -> str:
    """``policy/v1`` when the server serves it (Kubernetes >= 1.21), else ``policy/v1beta1``.

    ``group_versions`` are the server's ``policy`` group versions from discovery
    (``GET /apis/policy``), e.g. ``["policy/v1", "policy/v1beta1"]``; bare versions work too.
    """
    found = {gv if "/" in gv else f"policy/{gv}" for gv in group_versions}
    return PDB_V1 if PDB_V1 in found else PDB_V1BETA1


def pod_disruption_budget(
    pool: str, namespace: str, uid: str, spec: ModelPoolSpec, api_version: str = PDB_V1
) -> dict[str, Any]:
    """``maxUnavailable: 1``: a drain evicts one pool pod at a time, whatever the pool's size.

    ``minAvailable: 1`` would let a drain take all but one pod of a large pool at once, and a
    percentage would round to zero on small pools.
    """
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(pool, namespace, uid, spec),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(pool)}},
    }
