"""The Kubernetes custom resources of Foveal (group ``foveal.io``, version ``v1alpha1``).

One set of pydantic models is the source of truth for three readers:

- the operator validates ``ModelPool`` / ``RoutingPolicy`` specs with them and writes status;
- the router's watcher parses the same objects into its catalog and policies;
- the CustomResourceDefinitions are *generated* from them (``python -m foveal.api.crds``), so the
  API server's schema and the Python code cannot drift apart.

The CRDs must load on Kubernetes 1.20: ``apiextensions.k8s.io/v1`` with *structural* schemas
(every node typed, no ``$ref``, no CEL ``x-kubernetes-validations``). Rules that need more than
one field (``maxReplicas >= minReplicas``) live in :meth:`ModelPoolSpec.problems`; the operator
reports them as a ``Degraded`` condition instead of the API server rejecting the object.

    python -m foveal.api.crds            # rewrite helm/foveal-crds/templates/*.yaml
    python -m foveal.api.crds --check    # exit 1 naming the files that would change
    python -m foveal.api.crds --print    # the CRD YAML on stdout (foveal operator crds)
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "CONDITION_ACCEPTED",
    "CONDITION_DEGRADED",
    "CONDITION_READY",
    "CONDITION_SCALING",
    "CRD_FILES",
    "GROUP",
    "VERSION",
    "BackendArgs",
    "Cascade",
    "Condition",
    "CrdValidationError",
    "Exploration",
    "GpuSecondsBudget",
    "ModelPool",
    "ModelPoolSpec",
    "ModelPoolStatus",
    "ObjectMeta",
    "PoolDemand",
    "RoutingPolicy",
    "RoutingPolicySpec",
    "RoutingPolicyStatus",
    "ScalingSpec",
    "check",
    "crd_documents",
    "crds_yaml",
    "main",
    "model_pool_crd",
    "routing_policy_crd",
    "write",
]

GROUP = "foveal.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

CONDITION_READY = "Ready"
CONDITION_SCALING = "Scaling"
CONDITION_DEGRADED = "Degraded"
CONDITION_ACCEPTED = "Accepted"

# A tier name is a DNS-1123 label: it becomes a label value and part of URLs and metrics.
TIER_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_TEMPLATES = Path("helm") / "foveal-crds" / "templates"
CRD_FILES = {
    "modelpools": _TEMPLATES / "modelpools.yaml",
    "routingpolicies": _TEMPLATES / "routingpolicies.yaml",
}


class CrdValidationError(ValueError):
    """A custom resource does not match its schema; the message names every bad field."""

    def __init__(self, kind: str, name: str, problems: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.problems = problems
        super().__init__(f"invalid {kind} {name}: " + "; ".join(problems))


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes style), snake_case in Python; both accepted on input.

    Unknown fields are ignored, not rejected: the API server already prunes them from stored
    objects, and a newer CRD version must not break an older router that reads it.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    def to_wire(self) -> dict[str, Any]:
        """The Kubernetes (camelCase) form, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _format_errors(exc: ValidationError) -> list[str]:
    """One ``field.path: what is wrong`` line per error, in the camelCase of the manifest."""
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<object>"
        problems.append(f"{path}: {err['msg']}")
    return problems


# --------------------------------------------------------------------------------- ModelPool


class ScalingSpec(_Model):
    """How the operator turns the demand routers send to this tier into replicas."""

    target_in_flight_per_replica: float = Field(
        4.0, gt=0, description="In-flight requests one replica should carry."
    )
    target_requests_per_second_per_replica: float | None = Field(
        None, gt=0, description="Requests/s one replica should carry (optional second signal)."
    )
    ttft_objective_seconds: float | None = Field(
        None, gt=0, description="Time-to-first-token objective, informational for now."
    )
    scale_up_stabilization_seconds: int = Field(
        0, ge=0, description="Need for more replicas must last this long before scaling up."
    )
    scale_down_stabilization_seconds: int = Field(
        300,
        ge=0,
        description="Scale down only to the highest recommendation seen over this window.",
    )
    idle_seconds_to_zero: int = Field(
        600,
        ge=0,
        description="With minReplicas 0: no demand for this long scales the tier to zero.",
    )


class BackendArgs(_Model):
    """Backend-specific knobs (vLLM)."""

    max_pixels: int | None = Field(
        None, ge=1, description="vLLM max_pixels; default visualTokens*28*28."
    )
    limit_mm_per_prompt: int = Field(1, ge=1, description="Images allowed per prompt (vLLM).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra arguments appended to the server command."
    )


class ModelPoolSpec(_Model):
    """One visual-token tier served by one Deployment."""

    tier: str = Field(
        min_length=1,
        max_length=63,
        pattern=TIER_PATTERN,
        description="Tier name clients may pin (e.g. t16); a DNS-1123 label.",
    )
    visual_tokens: int = Field(ge=1, description="Visual tokens per image on this tier.")
    backend: Literal["reference", "vllm"] = Field(description="Serving backend.")
    model: str = Field("foveal-ref", min_length=1, description="Served model name.")
    image: str = Field(min_length=1, description="Container image of the pool server.")
    mechanism: Literal["resolution", "pool", "cls-topk", "kcenter"] = Field(
        "resolution", description="Token-reduction mechanism (reference backend only)."
    )
    backend_args: BackendArgs = Field(
        default_factory=BackendArgs, json_schema_extra={"default": {}}
    )
    port: int = Field(8000, ge=1, le=65535, description="Container and Service port.")
    replicas: int | None = Field(
        None, ge=0, description="Replicas now (scale subresource); the operator writes it."
    )
    min_replicas: int = Field(1, ge=0, description="Lowest replica count; 0 allows idle tiers.")
    max_replicas: int | None = Field(
        None,
        ge=1,
        description="Highest replica count (>= minReplicas; unset = max(minReplicas, 1)).",
    )
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Container resources (requests/limits)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node selector of the pool pods."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations of the pool pods."
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, json_schema_extra={"default": {}})
    cost_per_replica_hour: float = Field(
        0.0, ge=0, description="Price of one replica-hour (for cost-aware routing)."
    )

    @property
    def effective_max_replicas(self) -> int:
        """``maxReplicas``, or a fixed-size pool of ``max(minReplicas, 1)`` when unset."""
        return self.max_replicas if self.max_replicas is not None else max(self.min_replicas, 1)

    @property
    def effective_max_pixels(self) -> int:
        """vLLM ``max_pixels``: explicit, or the 28x28-pixel patches the tier's tokens cover."""
        if self.backend_args.max_pixels is not None:
            return self.backend_args.max_pixels
        return self.visual_tokens * 28 * 28

    def problems(self) -> list[str]:
        """Cross-field rules the schema cannot express on Kubernetes 1.20 (no CEL)."""
        found: list[str] = []
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            found.append(
                f"spec.maxReplicas ({self.max_replicas}) must be >= spec.minReplicas "
                f"({self.min_replicas})"
            )
        if self.replicas is not None and not (
            self.min_replicas <= self.replicas <= self.effective_max_replicas
        ):
            found.append(
                f"spec.replicas ({self.replicas}) is outside [minReplicas, maxReplicas] = "
                f"[{self.min_replicas}, {self.effective_max_replicas}]; the operator clamps it"
            )
        if self.backend == "vllm" and self.mechanism != "resolution":
            found.append(
                f"spec.mechanism ({self.mechanism!r}) applies to the reference backend only; "
                "vLLM tiers are set by backendArgs.maxPixels"
            )
        return found


class Condition(_Model):
    """A Kubernetes-style condition (the shape of metav1.Condition)."""

    type: str = Field(min_length=1, description="Ready, Scaling, Degraded or Accepted.")
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = Field(None, description="RFC 3339 time.")
    observed_generation: int | None = Field(None, ge=0)


class PoolDemand(_Model):
    """The demand routers reported for this tier at the last autoscaler pass."""

    requests_per_second: float = Field(0.0, ge=0)
    in_flight: float = Field(0.0, ge=0)
    observed_at: str | None = Field(None, description="RFC 3339 time of the observation.")


class ModelPoolStatus(_Model):
    replicas: int = Field(0, ge=0, description="Pods the Deployment has.")
    ready_replicas: int = Field(0, ge=0, description="Pods ready to serve.")
    desired_replicas: int = Field(0, ge=0, description="Replicas the autoscaler wants.")
    selector: str | None = Field(None, description="Label selector of the pods (scale).")
    endpoints: list[str] = Field(
        default_factory=list,
        description="Base URLs routers use; only meaningful while readyReplicas > 0.",
    )
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, ge=0)
    demand: PoolDemand | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectMeta(_Model):
    """The part of ``metadata`` Foveal reads."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ModelPool(_Model):
    api_version: str = API_VERSION
    kind: Literal["ModelPool"] = "ModelPool"
    metadata: ObjectMeta
    spec: ModelPoolSpec
    status: ModelPoolStatus = Field(default_factory=ModelPoolStatus)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ModelPool:
        """Parse an object from the API server; :class:`CrdValidationError` names bad fields."""
        data = dict(obj)
        data["status"] = data.get("status") or {}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise CrdValidationError("ModelPool", _name(obj), _format_errors(exc)) from None

    @property
    def serving_endpoints(self) -> list[str]:
        """Endpoints a router may send to: none while no replica is ready (a cold tier)."""
        return list(self.status.endpoints) if self.status.ready_replicas > 0 else []


# ----------------------------------------------------------------------------- RoutingPolicy


class GpuSecondsBudget(_Model):
    seconds: float = Field(gt=0, description="GPU-seconds allowed per period.")
    period: Literal["hour", "day", "month"]


class Exploration(_Model):
    algorithm: Literal["none", "linucb", "thompson"] = "none"
    rate: float = Field(0.0, ge=0, le=1, description="Share of requests that may explore.")


class Cascade(_Model):
    """Ask again one tier higher when the first answer's confidence is low."""

    threshold: float = Field(
        ge=0,
        le=1,
        description="Escalate below this confidence: exp(mean token log-probability) of the "
        "first answer (its geometric-mean token probability).",
    )
    max_escalations: int = Field(
        1, ge=1, le=4, description="Re-asks at the next higher allowed tier, at most."
    )


class RoutingPolicySpec(_Model):
    """How the router trades quality against cost for some tenants."""

    tenants: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description='Tenants this policy applies to; ["*"] = every tenant without a '
        "more specific policy.",
    )
    quality_weight: float = Field(0.0, ge=0, description="lambda in P(correct) - lambda * cost.")
    quality_floor: float = Field(
        0.0, ge=0, le=1, description="Lowest predicted P(correct) a chosen tier may have."
    )
    allowed_tiers: list[Annotated[str, Field(pattern=TIER_PATTERN, max_length=63)]] = Field(
        default_factory=list, description="Tiers this policy may route to (empty = all)."
    )
    gpu_seconds_budget: GpuSecondsBudget | None = None
    exploration: Exploration | None = None
    allow_session_downgrade: bool = Field(
        False,
        description="Whether a session's next auto-routed turn may use a lower tier than the "
        "one that answered its previous turn.",
    )
    cascade: Cascade | None = None


class RoutingPolicyStatus(_Model):
    accepted: bool | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, ge=0)


class RoutingPolicy(_Model):
    api_version: str = API_VERSION
    kind: Literal["RoutingPolicy"] = "RoutingPolicy"
    metadata: ObjectMeta
    spec: RoutingPolicySpec
    status: RoutingPolicyStatus = Field(default_factory=RoutingPolicyStatus)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> RoutingPolicy:
        data = dict(obj)
        data["status"] = data.get("status") or {}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise CrdValidationError("RoutingPolicy", _name(obj), _format_errors(exc)) from None


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace"), meta.get("name")
    return f"{ns}/{name}" if ns else str(name or "<unnamed>")


# ------------------------------------------------------------------- structural CRD schemas

_KEEP = ("description", "enum", "pattern", "minLength", "maxLength", "minItems", "maxItems")
_PRESERVE = "x-kubernetes-preserve-unknown-fields"


def _structural(
    schema: Mapping[str, Any], defs: Mapping[str, Any], *, defaults: bool
) -> dict[str, Any]:
    """One pydantic JSON-schema node -> an OpenAPI v3 node that Kubernetes calls structural.

    Inlines ``$ref``, drops ``title``, turns ``anyOf [X, null]`` (an optional field) into
    ``X``, maps 2020-12 numeric exclusive bounds to OpenAPI 3.0's boolean form, and types
    free-form objects with ``x-kubernetes-preserve-unknown-fields``.
    """
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _structural(merged, defs, defaults=defaults)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union structurally: {schema['anyOf']}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return _structural({**options[0], **rest}, defs, defaults=defaults)

    out: dict[str, Any] = {}
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        kind = "string"
    if kind is None:  # Any: keep whatever the user wrote
        out["type"] = "object"
        out[_PRESERVE] = True
    else:
        out["type"] = kind
    for key in _KEEP:
        if key in schema:
            out[key] = schema[key]
    for bound in ("minimum", "maximum"):
        if bound in schema:
            out[bound] = schema[bound]
    if "exclusiveMinimum" in schema:
        out["minimum"], out["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        out["maximum"], out["exclusiveMaximum"] = schema["exclusiveMaximum"], True
    if defaults and "default" in schema and schema["default"] is not None:
        out["default"] = schema["default"]

    if kind == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props:
            out["properties"] = {
                name: _structural(sub, defs, defaults=defaults) for name, sub in props.items()
            }
            if schema.get("required"):
                out["required"] = list(schema["required"])
        elif isinstance(extra, dict) and extra.get("type") not in (None, "object"):
            out["additionalProperties"] = _structural(extra, defs, defaults=defaults)
        else:
            out[_PRESERVE] = True
    elif kind == "array":
        out["items"] = _structural(schema.get("items", {}), defs, defaults=defaults)
    return out


def _schema_of(model: type[BaseModel], *, defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}), defaults=defaults)


def _conditions_as_map(status: dict[str, Any]) -> dict[str, Any]:
    # One condition per type: lets server-side apply merge conditions by their type.
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return status


def _root_schema(spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def _crd(
    *,
    kind: str,
    plural: str,
    short: list[str],
    description: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    schema = {"description": description, **schema}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "annotations": {"helm.sh/resource-policy": "keep"},
            "labels": {"app.kubernetes.io/part-of": "foveal"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["foveal"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _column(name: str, type_: str, path: str, description: str = "") -> dict[str, Any]:
    col = {"name": name, "type": type_, "jsonPath": path}
    if description:
        col["description"] = description
    return col


def model_pool_crd() -> dict[str, Any]:
    spec = _schema_of(ModelPoolSpec, defaults=True)
    status = _conditions_as_map(_schema_of(ModelPoolStatus, defaults=False))
    return _crd(
        kind="ModelPool",
        plural="modelpools",
        short=["mp"],
        description="A visual-token tier: the model, backend and replicas that serve it.",
        schema=_root_schema(spec, status),
        columns=[
            _column("Tier", "string", ".spec.tier"),
            _column("Tokens", "integer", ".spec.visualTokens", "Visual tokens per image"),
            _column("Backend", "string", ".spec.backend"),
            _column("Desired", "integer", ".spec.replicas", "Replicas the operator set"),
            _column("Ready", "integer", ".status.readyReplicas"),
            _column("Age", "date", ".metadata.creationTimestamp"),
        ],
        subresources={
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
    )


def routing_policy_crd() -> dict[str, Any]:
    spec = _schema_of(RoutingPolicySpec, defaults=True)
    status = _conditions_as_map(_schema_of(RoutingPolicyStatus, defaults=False))
    return _crd(
        kind="RoutingPolicy",
        plural="routingpolicies",
        short=["rp"],
        description="How the router trades answer quality against cost for some tenants.",
        schema=_root_schema(spec, status),
        columns=[
            _column("Tenants", "string", ".spec.tenants"),
            _column("Lambda", "number", ".spec.qualityWeight", "Cost weight"),
            _column("Floor", "number", ".spec.qualityFloor", "Quality floor"),
            _column("Accepted", "boolean", ".status.accepted"),
            _column("Age", "date", ".metadata.creationTimestamp"),
        ],
        subresources={"status": {}},
    )


def crd_documents() -> dict[str, dict[str, Any]]:
    """Plural -> CRD object, in a stable order."""
    return {"modelpools": model_pool_crd(), "routingpolicies": routing_policy_crd()}


_HEADER = (
    "# GENERATED by `python -m foveal.api.crds` from foveal/api/crds.py: do not edit.\n"
    "# Helm keeps CRDs on uninstall (resource-policy: keep) so custom resources survive.\n"
)


def _dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(copy.deepcopy(doc), sort_keys=False, default_flow_style=False, width=100)


def rendered_files() -> dict[Path, str]:
    """Repository-relative path -> exact file content."""
    return {CRD_FILES[plural]: _HEADER + _dump(doc) for plural, doc in crd_documents().items()}


def crds_yaml() -> str:
    """All CRDs as one multi-document YAML stream (for ``kubectl apply -f -``)."""
    return "---\n".join(_dump(doc) for doc in crd_documents().values())


def write(root: Path = _REPO_ROOT) -> list[Path]:
    """Write the generated files; returns the paths that changed."""
    changed = []
    for rel, text in rendered_files().items():
        path = root / rel
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
    return changed


def check(root: Path = _REPO_ROOT) -> list[Path]:
    """Paths whose committed content differs from what the models generate."""
    return [
        rel
        for rel, text in rendered_files().items()
        if not (root / rel).exists() or (root / rel).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foveal.api.crds", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the files would change")
    mode.add_argument("--print", action="store_true", help="print the CRDs to stdout")
    parser.add_argument("--root", type=Path, default=_REPO_ROOT, help="repository root")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(crds_yaml())
        return 0
    if args.check:
        drift = check(args.root)
        for rel in drift:
            print(f"drift: {rel} differs from the models; run `python -m foveal.api.crds`")
        return 1 if drift else 0
    for rel in write(args.root):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
