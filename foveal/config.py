"""One typed settings model for every Foveal process.

Sources, highest priority first: keyword arguments (CLI flags), environment variables
(``FOVEAL_…``, nested with ``__``, e.g. ``FOVEAL_GATEWAY__PORT=8080``), an optional YAML file
(``FOVEAL_CONFIG=path.yaml`` or ``--config``), then the defaults below.
Every field carries a description; ``foveal config schema`` prints the JSON schema.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = [
    "AuthSettings",
    "CascadeSettings",
    "CatalogSettings",
    "EndpointSettings",
    "GatewaySettings",
    "GrpcSettings",
    "ImageUrlSettings",
    "LimitsSettings",
    "LocalPoolSettings",
    "PolicySettings",
    "PoolClientSettings",
    "SessionSettings",
    "Settings",
    "StoreSettings",
    "TenantPolicySettings",
    "TierSettings",
    "load_settings",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewaySettings(_Section):
    host: str = Field("127.0.0.1", description="Address the OpenAI-compatible HTTP gateway binds.")
    port: int = Field(8080, ge=0, le=65535, description="Gateway port; 0 picks a free port.")


class GrpcSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the gRPC router binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")


class StoreSettings(_Section):
    url: str = Field(
        "sqlite:///foveal.db",
        description="SQLAlchemy URL of the store: a SQLite file by default, "
        "`postgresql+psycopg://user:pass@host/db` in production.",
    )
    batch_interval_s: float = Field(
        0.05, gt=0, description="Decisions are written in batches at most this often."
    )
    batch_max: int = Field(256, ge=1, description="Largest batch of decisions per write.")
    queue_max: int = Field(
        100_000,
        ge=1,
        description="Decisions waiting to be written before requests are refused (429).",
    )


class AuthSettings(_Section):
    enabled: bool = Field(
        False, description="Require an API key (`Authorization: Bearer KEY`) on every call."
    )
    default_tenant: str = Field(
        "default", description="Tenant of every request when auth is disabled."
    )
    feedback_secret: str = Field(
        "",
        description="HMAC key for feedback tokens. Empty: a random key per process "
        "(tokens then die with the process). Set it when several routers share a store.",
    )
    feedback_token_ttl_s: int = Field(
        86_400, gt=0, description="Seconds a feedback token stays valid."
    )
    key_cache_ttl_s: float = Field(
        30.0, ge=0, description="Seconds a verified API key is cached in memory."
    )


class ImageUrlSettings(_Section):
    enabled: bool = Field(
        False,
        description="Allow `http(s)://` image URLs (refused by default; `data:` always works).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts image URLs may name: exact names or `*.example.com` suffixes.",
    )
    allow_private_addresses: bool = Field(
        False,
        description="Let an allowlisted host resolve to a private/loopback/link-local address. "
        "Redirects to such addresses are refused regardless.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Total time allowed to fetch one image.")
    max_bytes: int = Field(10 * 2**20, gt=0, description="Largest image a URL may return.")
    max_redirects: int = Field(3, ge=0, description="Redirects followed per image URL.")


class LimitsSettings(_Section):
    max_body_bytes: int = Field(
        20 * 2**20, gt=0, description="Largest request body accepted (HTTP 413 above it)."
    )
    max_images: int = Field(8, ge=0, description="Most images in one request.")
    max_image_pixels: int = Field(
        25_000_000,
        gt=0,
        description="Most pixels an image may declare; checked from its header before decoding.",
    )
    max_tokens_cap: int = Field(
        4096, gt=0, description="Default cap on `max_tokens` for tenants without their own."
    )
    default_max_tokens: int = Field(
        256, gt=0, description="`max_tokens` used when the request gives none."
    )


class EndpointSettings(_Section):
    url: str = Field(description="Base URL of an OpenAI-compatible server, e.g. http://h:8000.")
    model: str | None = Field(
        None, description="Model name sent to this endpoint (defaults to the tier's model)."
    )


class TierSettings(_Section):
    name: str = Field(description="Tier name clients may pin as `model`, e.g. `t16`.")
    visual_tokens: int = Field(gt=0, description="Visual-token budget per image.")
    cost_weight: float = Field(1.0, gt=0, description="Relative cost of one request on this tier.")
    backend: Literal["reference", "vllm", "fake"] = Field(
        "reference",
        description="What serves the tier: the reference VLM, vLLM, or the test fake. "
        "`foveal up` starts a local pool of this backend for each tier without endpoints "
        "(reference or fake; vllm tiers need endpoints).",
    )
    model: str = Field("foveal-ref", description="Model name the pool serves.")
    endpoints: list[EndpointSettings] = Field(
        default_factory=list, description="Replicas serving the tier."
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or v == "auto" or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("tier names are alphanumeric (with - or _) and not 'auto'")
        return v


class LocalPoolSettings(_Section):
    """The reference-VLM pools `foveal up` starts in its own process, one per tier."""

    checkpoint: str | None = Field(
        None,
        description="Reference-VLM checkpoint the local pools load (once, shared by every "
        "tier). Default: the checkpoint shipped in the package.",
    )
    mechanism: Literal["resolution", "pool", "cls-topk", "kcenter"] = Field(
        "resolution", description="How each tier gets its visual tokens."
    )
    max_batch: int = Field(4, ge=1, description="Requests per forward pass, per tier.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long a batch waits for more requests (ms)."
    )
    max_queue: int = Field(
        32, ge=1, description="Waiting requests per tier beyond which new ones get HTTP 429."
    )
    max_new_tokens: int = Field(
        48, ge=1, description="Cap on generated tokens, whatever `max_tokens` asks."
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads of each forward pass.")
    workers: int = Field(
        1,
        ge=1,
        description="Forward passes running at once across all tiers (the tiers share these "
        "threads, so the stack stays within workers x threads cores).",
    )


class PoolClientSettings(_Section):
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of one request across all retries and fallbacks."
    )
    connect_timeout_s: float = Field(1.0, gt=0, description="Connect timeout per attempt.")
    max_connections_per_endpoint: int = Field(
        256, gt=0, description="Pooled connections kept per endpoint."
    )
    breaker_failures: int = Field(
        3, ge=1, description="Consecutive failures that open an endpoint's circuit breaker."
    )
    breaker_reset_s: float = Field(
        5.0, gt=0, description="Seconds an open breaker waits before one trial request."
    )
    health_interval_s: float = Field(
        2.0, gt=0, description="Seconds between health checks (`GET /health`) of each endpoint."
    )
    health_timeout_s: float = Field(1.0, gt=0, description="Timeout of one health check.")
    fallback: bool = Field(
        True,
        description="When every endpoint of the chosen tier fails, try the nearest higher "
        "tier, then lower ones. Pinned requests (model = a tier name) never fall back.",
    )


class PolicySettings(_Section):
    name: str = Field(
        "model",
        description="Routing policy, by registry name: model (the sufficiency model under the "
        "tenant policy), linucb or lints (bandits warm-started from it), rules.",
    )
    model_path: str | None = Field(
        None,
        description="Sufficiency-model artifact (`.npz`, with its `.json` beside it) of the "
        "learned policies (`model`, `linucb`, `lints`); made by `foveal router train`. "
        "Default: the model shipped with Foveal.",
    )
    default_tier: str | None = Field(
        None, description="Tier for requests no rule matches (default: the middle tier)."
    )
    high_tier: str | None = Field(
        None, description="Tier for reading/OCR/document/chart prompts (default: the top tier)."
    )
    low_tier: str | None = Field(
        None, description="Tier for small images with general prompts (default: the lowest)."
    )
    small_image_pixels: int = Field(
        256 * 256, gt=0, description="Images at or below this many pixels count as small."
    )
    large_image_pixels: int = Field(
        1536 * 1536,
        gt=0,
        description="Images above this many pixels go one tier above the default.",
    )
    high_keywords: list[str] = Field(
        default_factory=lambda: [
            "read",
            "text",
            "ocr",
            "document",
            "chart",
            "graph",
            "table",
            "written",
            "says",
            "word",
            "number",
            "digit",
            "label",
            "sign",
            "receipt",
            "invoice",
            "page",
            "transcribe",
            "spell",
            "letter",
            "plot",
            "axis",
            "field",
            "form",
        ],
        description="Prompt words that call for full resolution.",
    )
    low_keywords: list[str] = Field(
        default_factory=lambda: ["colour", "color", "is there", "describe briefly"],
        description="Prompt words of general questions that survive heavy compression.",
    )
    bandit_alpha: float = Field(
        1.0,
        ge=0,
        description="`linucb`: width of the confidence bound added to each tier's estimate "
        "(0: greedy).",
    )
    bandit_noise: float = Field(
        0.5,
        gt=0,
        description="`lints`: scale v of the Thompson draws, θ̃ ~ N(θ, v²·A⁻¹).",
    )
    bandit_prior_strength: float = Field(
        10.0,
        gt=0,
        description="`linucb`/`lints`: how many observations the sufficiency model's "
        "prediction is worth before feedback moves a tenant's estimates (the ridge prior).",
    )
    bandit_epsilon: float = Field(
        0.0,
        ge=0,
        le=1,
        description="`linucb`/`lints`: share of requests routed to a uniformly drawn allowed "
        "tier, for tenants whose policy sets no exploration.",
    )
    bandit_max_tenants: int = Field(
        1000,
        ge=1,
        description="`linucb`/`lints`: tenants with learned state of their own; later tenants "
        "route on the shared prior and do not learn (a warning names the first of them).",
    )
    bandit_persist_every: int = Field(
        50,
        ge=1,
        description="`linucb`/`lints`: a tenant's learned state is written to the store "
        "after this many updates (and on shutdown).",
    )
    bandit_persist_interval_s: float = Field(
        60.0,
        gt=0,
        description="`linucb`/`lints`: a tenant's learned state is also written at its first "
        "update this long after its last write.",
    )


class CatalogSettings(_Section):
    source: Literal["static", "kubernetes"] = Field(
        "static",
        description="Where the router's tiers and tenant policies come from: `static` = the "
        "`tiers` and `tenant_policy` settings; `kubernetes` = ModelPool and RoutingPolicy "
        "objects, watched (read-only) and swapped in as they change.",
    )
    namespace: str | None = Field(
        None,
        description="Namespace of the ModelPools and RoutingPolicies (kubernetes source). "
        "Default: the pod's own namespace in a cluster, else the kubeconfig context's, "
        "else `default`.",
    )
    kubeconfig: str | None = Field(
        None,
        description="Kubeconfig file (kubernetes source). Default: the in-cluster service "
        "account when running in a pod, else `$KUBECONFIG` or `~/.kube/config`.",
    )
    resync_interval_s: float = Field(
        300.0,
        gt=0,
        description="Each watch ends after this long and the objects are listed again "
        "(a full resync that repairs any missed event).",
    )
    backoff_max_s: float = Field(
        30.0, gt=0, description="Longest wait between reconnects after API server errors."
    )
    initial_sync_timeout_s: float = Field(
        10.0,
        ge=0,
        description="How long start-up waits for the first list of both kinds before serving "
        "anyway (with what it has; the watch keeps retrying).",
    )


class GpuBudgetSettings(_Section):
    seconds: float = Field(gt=0, description="GPU-seconds a tenant may spend per period.")
    period: Literal["hour", "day", "month"] = Field(description="The budget's period.")


class ExplorationSettings(_Section):
    algorithm: Literal["none", "linucb", "thompson"] = Field(
        "none", description="Exploration algorithm of the learned policy."
    )
    rate: float = Field(0.0, ge=0, le=1, description="Share of requests that explore.")


class CascadeSettings(_Section):
    threshold: float = Field(
        ge=0,
        le=1,
        description="Escalate when the answer's confidence is below this: the geometric-mean "
        "token probability, exp(mean token log-probability), of the first answer.",
    )
    max_escalations: int = Field(
        1, ge=1, le=4, description="Re-asks at the next higher allowed tier, at most."
    )


class SessionSettings(_Section):
    max_sessions: int = Field(
        100_000,
        ge=1,
        description="Sessions whose last answering tier the router remembers (least recently "
        "used ones are forgotten first).",
    )
    ttl_s: float = Field(
        3600.0,
        gt=0,
        description="A session not seen for this long is forgotten (its next turn has no "
        "session floor).",
    )


class TenantPolicySettings(_Section):
    quality_weight: float = Field(
        0.0,
        ge=0,
        description="λ: weight of cost against quality (the learned policy maximises "
        "P(correct) - λ·cost). Recorded in every decision.",
    )
    quality_floor: float = Field(
        0.0, ge=0, le=1, description="Lowest acceptable P(correct). Recorded in every decision."
    )
    allowed_tiers: list[str] = Field(
        default_factory=list,
        description="Tiers the tenant may use (empty: all). Auto-routed requests are moved "
        "to the nearest allowed tier (upward first); pinning another tier is refused (403).",
    )
    gpu_seconds_budget: GpuBudgetSettings | None = Field(
        None,
        description="GPU-seconds budget, `{seconds: > 0, period: hour|day|month}` "
        "(recorded in decisions; not enforced yet).",
    )
    exploration: ExplorationSettings | None = Field(
        None,
        description="Exploration of the learned policy, `{algorithm: none|linucb|thompson, "
        "rate: 0..1}` (recorded in decisions).",
    )
    allow_session_downgrade: bool = Field(
        False,
        description="Whether an auto-routed turn of a session may go to a lower tier than "
        "the one that answered the session's previous turn (off: that tier is a floor).",
    )
    cascade: CascadeSettings | None = Field(
        None,
        description="Cascade of auto-routed, non-streamed requests, `{threshold: 0..1, "
        "max_escalations: 1..4}`: a low-confidence answer is asked again one tier higher.",
    )


def _default_tiers() -> list[TierSettings]:
    return [
        TierSettings(name=n, visual_tokens=k, cost_weight=float(k))
        for n, k in (("t1", 1), ("t4", 4), ("t16", 16), ("t64", 64), ("t256", 256))
    ]


class Settings(BaseSettings):
    """Everything one Foveal process reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="FOVEAL_", env_nested_delimiter="__", extra="forbid"
    )

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    image_urls: ImageUrlSettings = Field(default_factory=ImageUrlSettings)
    pool_client: PoolClientSettings = Field(default_factory=PoolClientSettings)
    local_pools: LocalPoolSettings = Field(
        default_factory=LocalPoolSettings,
        description="The reference-VLM pools `foveal up` runs for tiers without endpoints.",
    )
    policy: PolicySettings = Field(default_factory=PolicySettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    sessions: SessionSettings = Field(
        default_factory=SessionSettings,
        description="The in-memory map of each session's last answering tier.",
    )
    tenant_policy: TenantPolicySettings = Field(
        default_factory=TenantPolicySettings,
        description="The policy of tenants no RoutingPolicy names (and of every tenant with "
        "the static catalog source).",
    )
    tiers: list[TierSettings] = Field(
        default_factory=_default_tiers,
        description="The tiers, each a visual-token budget served by its own pool.",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: str = Field("INFO", description="Python log level.")

    @model_validator(mode="after")
    def _check_tiers(self) -> Settings:
        names = [t.name for t in self.tiers]
        if not names:
            raise ValueError("at least one tier is required")
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if self.catalog.source != "static":
            return self  # the tiers come from ModelPools; the policy skips tiers not there
        for field in ("default_tier", "high_tier", "low_tier"):
            value = getattr(self.policy, field)
            if value is not None and value not in names:
                raise ValueError(f"policy.{field}={value!r} is not a tier ({names})")
        unknown = [t for t in self.tenant_policy.allowed_tiers if t not in names]
        if unknown:
            raise ValueError(f"tenant_policy.allowed_tiers: {unknown} are not tiers ({names})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the YAML file (argument or ``FOVEAL_CONFIG``), the environment and
    explicit overrides (highest priority)."""
    path = config_file or os.environ.get("FOVEAL_CONFIG")
    if not path:
        return Settings(**overrides)
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": str(path)})

    return _FromFile(**overrides)
