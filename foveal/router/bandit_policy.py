"""The ``linucb`` and ``lints`` routing policies: contextual bandits over tiers, per tenant.

Each request's compact context (:mod:`foveal.router.features`) goes to the tenant's own
bandit (:mod:`foveal.router.bandits`), whose arms are the tiers. A tier's estimated
P(correct) is the sufficiency model's prediction plus a learned linear correction; the choice
maximises ``P̂ - λ·cost_norm`` (plus the bandit's exploration) over the allowed tiers whose
P̂ meets the tenant's quality floor (if none does: the tier with the highest P̂), where
``cost_norm`` = the tier's cost weight / the largest in the catalog.

Exploration on top of the bandit's own: a share ε of requests goes to a uniformly drawn
allowed tier, ε being the tenant policy's exploration rate (any algorithm but ``none``, which
turns it off) or else ``policy.bandit_epsilon``. Every decision records the probability of
each tier (``features["action_probs"]``) and its propensity.

Learning. Feedback (a score in [0, 1]) becomes the target ``clip(score) - P_model(tier)``
of the tier that answered: the bandit learns the model's residual, so before any feedback it
routes exactly like the model (the warm start), and since the cost term is known exactly it
is not learned: maximising ``P̂ - λ·cost_norm`` is maximising the expected reward
``score - λ·cost_norm`` of the issue, and a tenant changing λ needs no relearning.

Isolation. Every tenant has its own bandit: one tenant's feedback never moves another's
routing. Feedback tokens are single use (the store's primary key), scores are clipped to
[0, 1] and targets to ±1, and a non-finite score is refused, so one feedback moves an
estimate by a bounded amount. Beyond ``policy.bandit_max_tenants`` tenants, new tenants route
on the shared prior and do not learn.

Persistence. With :meth:`BanditPolicy.bind_store` (the router app calls it at start) each
tenant's state is loaded from the store's ``learned_state`` table (key
``<policy>:<tenant>``) and written back, on a worker thread, after
``policy.bandit_persist_every`` updates or at the first update
``policy.bandit_persist_interval_s`` after the last write, and on :meth:`close`. A state
learned on another features version or sufficiency model is dropped (with a warning): its
residuals were relative to another model. Replicas each learn from the feedback they
receive and the last write wins.

Off-policy evaluation replays the policy on logged decisions with
:meth:`BanditPolicy.action_probabilities` (see :mod:`foveal.router.ope`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from foveal.config import PolicySettings
from foveal.router.bandits import (
    BanditStateError,
    LinearBandit,
    LinTS,
    LinUCB,
    Selection,
    bandit_from_dict,
    clip_score,
)
from foveal.router.features import (
    CONTEXT_DIM,
    FEATURES_VERSION,
    FeatureExtractor,
    RequestFeatures,
    context_from_summary,
)
from foveal.router.model_policy import decision_features
from foveal.router.policies import Decision, DecisionContext, Reward, register_policy
from foveal.router.sufficiency import ArtifactError, SufficiencyModel
from foveal.router.tenant_policy import TenantPolicy

__all__ = ["NEUTRAL_P", "BanditPolicy", "StateStore"]

log = logging.getLogger(__name__)

NEUTRAL_P = 0.5  # P(correct) assumed for a tier the sufficiency model does not predict
_ROUND = 4


class _Model(Protocol):
    version: str

    def predict(self, f: RequestFeatures) -> dict[str, float]: ...


class StateStore(Protocol):
    """What the policy needs of :class:`foveal.store.Store`."""

    def list_learned_state(self, policy: str) -> dict[str, dict[str, Any]]: ...

    def put_learned_state(
        self, key: str, tenant: str | None, policy: str, payload: dict[str, Any]
    ) -> None: ...


_DEFAULT_MODEL: Any = object()


def _load_model(settings: PolicySettings) -> _Model | None:
    """The configured sufficiency model; without one configured, the shipped one or None (the
    bandits then start from P = NEUTRAL_P). A configured model that cannot load is an error."""
    if settings.model_path:
        return SufficiencyModel.load(Path(settings.model_path))
    try:
        return SufficiencyModel.default()
    except ArtifactError as exc:
        log.warning("bandit policies: no sufficiency model (%s); starting from P = 0.5", exc)
        return None


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything a choice depends on, rebuilt the same way at request time and in replay."""

    bandit: LinearBandit
    x: npt.NDArray[np.float64]
    allowed: list[str]
    eligible: list[str]
    base: dict[str, float]
    estimate: dict[str, float]
    cheapest_meeting_floor: str | None
    epsilon: float
    quality_weight: float
    quality_floor: float


class BanditPolicy:
    """LinUCB (``linucb``) or linear Thompson sampling (``lints``), one bandit per tenant."""

    def __init__(
        self,
        settings: PolicySettings,
        algorithm: str,
        *,
        model: Any = _DEFAULT_MODEL,
        extractor: FeatureExtractor | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        if algorithm not in ("linucb", "lints"):
            raise ValueError(f"unknown bandit algorithm {algorithm!r} (linucb or lints)")
        self.name = algorithm
        self._settings = settings
        self._model: _Model | None = _load_model(settings) if model is _DEFAULT_MODEL else model
        self._extractor = extractor or FeatureExtractor()
        self._rng = rng or np.random.default_rng()
        self._prior = self._new_bandit()
        self._tenants: dict[str, LinearBandit] = {}
        self._over_cap_warned = False
        self._store: StateStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the bookkeeping below (loop + writer thread)
        self._dirty: dict[str, int] = {}  # tenant -> updates not yet written
        self._saved_at: dict[str, float] = {}
        self._saving: dict[str, Future[None]] = {}
        self.skipped_updates = 0  # rewards that could not be learned from (logged)

    # ---- state -----------------------------------------------------------------------------

    @property
    def model_version(self) -> str | None:
        return None if self._model is None else str(self._model.version)

    def _new_bandit(self) -> LinearBandit:
        s = self._settings
        if self.name == "linucb":
            return LinUCB(
                CONTEXT_DIM,
                alpha=s.bandit_alpha,
                prior_precision=s.bandit_prior_strength,
                epsilon=s.bandit_epsilon,
            )
        return LinTS(
            CONTEXT_DIM,
            noise=s.bandit_noise,
            prior_precision=s.bandit_prior_strength,
            epsilon=s.bandit_epsilon,
        )

    def bandit(self, tenant: str, *, create: bool = False) -> LinearBandit | None:
        """The tenant's own bandit; with ``create``, a fresh one unless over the tenant cap."""
        found = self._tenants.get(tenant)
        if found is not None or not create:
            return found
        if len(self._tenants) >= self._settings.bandit_max_tenants:
            if not self._over_cap_warned:
                self._over_cap_warned = True
                log.warning(
                    "%s: %d tenants have learned state (policy.bandit_max_tenants); tenant %r "
                    "and later ones route on the shared prior without learning",
                    self.name,
                    len(self._tenants),
                    tenant,
                )
            return None
        found = self._tenants[tenant] = self._new_bandit()
        return found

    def state_key(self, tenant: str) -> str:
        return f"{self.name}:{tenant}"

    def state_payload(self, tenant: str, bandit: LinearBandit) -> dict[str, Any]:
        return {
            "tenant": tenant,
            "features_version": FEATURES_VERSION,
            "model_version": self.model_version,
            "bandit": bandit.to_dict(),
        }

    def load_payload(self, payload: Mapping[str, Any]) -> tuple[str, LinearBandit]:
        """(tenant, bandit) from a stored payload; BanditStateError when it does not apply."""
        tenant = payload.get("tenant")
        if not isinstance(tenant, str):
            raise BanditStateError("learned state names no tenant")
        for field, ours in (
            ("features_version", FEATURES_VERSION),
            ("model_version", self.model_version),
        ):
            if payload.get(field) != ours:
                raise BanditStateError(
                    f"learned state of tenant {tenant!r} was made with {field} "
                    f"{payload.get(field)!r}, the router now uses {ours!r}"
                )
        bandit = bandit_from_dict(payload.get("bandit") or {}, dim=CONTEXT_DIM)
        if bandit.algorithm != self.name:
            raise BanditStateError(f"learned state is for {bandit.algorithm}, not {self.name}")
        fresh = self._new_bandit()  # today's settings win over the stored ones
        bandit.epsilon = fresh.epsilon
        if isinstance(bandit, LinUCB) and isinstance(fresh, LinUCB):
            bandit.alpha = fresh.alpha
        if isinstance(bandit, LinTS) and isinstance(fresh, LinTS):
            bandit.noise = fresh.noise
        return tenant, bandit

    def bind_store(self, store: StateStore) -> None:
        """Load every tenant's state from ``store`` and persist to it from now on (blocking)."""
        self.load_state(store)
        self._store = store
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-state")
        now = time.monotonic()
        self._saved_at = dict.fromkeys(self._tenants, now)

    def load_state(self, store: StateStore) -> int:
        """Load every tenant's stored state (blocking; nothing is written back); how many."""
        loaded = 0
        for key, payload in store.list_learned_state(self.name).items():
            try:
                tenant, bandit = self.load_payload(payload)
            except BanditStateError as exc:
                log.warning("%s: ignoring learned state %r: %s", self.name, key, exc)
                continue
            self._tenants[tenant] = bandit
            loaded += 1
        log.info("%s: loaded the learned state of %d tenants", self.name, loaded)
        return loaded

    def _maybe_save(self, tenant: str, bandit: LinearBandit) -> None:
        if self._store is None or self._executor is None:
            return
        s = self._settings
        now = time.monotonic()
        with self._lock:
            dirty = self._dirty[tenant] = self._dirty.get(tenant, 0) + 1
            due = dirty >= s.bandit_persist_every or (
                now - self._saved_at.get(tenant, now) >= s.bandit_persist_interval_s
            )
            self._saved_at.setdefault(tenant, now)
            pending = self._saving.get(tenant)
            if not due or (pending is not None and not pending.done()):
                return
            self._dirty[tenant] = 0
            self._saved_at[tenant] = now
            snapshot = bandit.copy()  # the worker serialises a copy: updates go on meanwhile
            self._saving[tenant] = self._executor.submit(self._save, tenant, snapshot, dirty)

    def _save(self, tenant: str, bandit: LinearBandit, updates: int) -> None:
        assert self._store is not None
        try:
            self._store.put_learned_state(
                self.state_key(tenant), tenant, self.name, self.state_payload(tenant, bandit)
            )
        except Exception:
            log.exception("%s: could not write the learned state of %r", self.name, tenant)
            with self._lock:  # written again with the next due update or on close
                self._dirty[tenant] = self._dirty.get(tenant, 0) + updates

    def drain(self) -> None:
        """Wait for the writes already scheduled (blocking)."""
        with self._lock:
            pending = [f for f in self._saving.values() if not f.done()]
        for future in pending:
            future.result()

    def flush(self) -> None:
        """Write every tenant's unsaved updates now (blocking; call from a thread)."""
        if self._store is None:
            return
        self.drain()
        with self._lock:
            dirty = [t for t, n in self._dirty.items() if n > 0]
            counts = {t: self._dirty[t] for t in dirty}
            for t in dirty:
                self._dirty[t] = 0
        for tenant in dirty:
            bandit = self._tenants.get(tenant)
            if bandit is not None:
                self._save(tenant, bandit.copy(), counts[tenant])

    def close(self) -> None:
        """Flush and stop the writer thread (the router app calls this on shutdown)."""
        self.flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- choosing --------------------------------------------------------------------------

    def _plan(
        self,
        tenant: str,
        x: npt.NDArray[np.float64],
        prior: Mapping[str, float],
        costs: Mapping[str, float],
        tp: TenantPolicy | Mapping[str, Any] | None,
    ) -> _Plan:
        names = list(costs)  # cheapest first
        lam, floor, allowed_set, eps = _tenant_terms(tp, self._settings.bandit_epsilon)
        allowed = [n for n in names if not allowed_set or n in allowed_set] or names
        bandit = self.bandit(tenant) or self._prior
        means, _ = bandit.estimate(x, allowed, prior)
        estimate = {n: float(m) for n, m in zip(allowed, means, strict=True)}
        meeting = [n for n in allowed if estimate[n] >= floor]
        eligible = meeting or [max(allowed, key=lambda n: estimate[n])]
        top = max(costs.values()) or 1.0
        base = {n: prior[n] - lam * costs[n] / top for n in eligible}
        return _Plan(
            bandit,
            x,
            allowed,
            eligible,
            base,
            estimate,
            meeting[0] if meeting else None,
            eps,
            lam,
            floor,
        )

    def _prior_p(
        self, f: RequestFeatures, names: Sequence[str], has_image: bool
    ) -> dict[str, float]:
        if self._model is None or not has_image:  # no image: every tier sees the same input
            return dict.fromkeys(names, NEUTRAL_P)
        predicted = self._model.predict(f)
        return {n: float(predicted.get(n, NEUTRAL_P)) for n in names}

    def select(self, ctx: DecisionContext) -> Decision:
        req, catalog = ctx.request, ctx.catalog
        f = self._extractor.extract(req, ctx.previous_tier)
        x = _rounded(f.context)
        prior = {
            n: round(p, _ROUND)
            for n, p in self._prior_p(f, catalog.names, bool(req.images)).items()
        }
        costs = {t.name: t.cost_weight for t in catalog.tiers}
        plan = self._plan(req.tenant, x, prior, costs, ctx.tenant_policy)
        if req.pinned:
            tier, propensity, chosen_by = req.model, 1.0, "pinned"
            reason = "pinned by request"
            probs: dict[str, float] = {tier: 1.0}
        else:
            sel: Selection = plan.bandit.select(
                x,
                plan.eligible,
                base=plan.base,
                epsilon=plan.epsilon,
                explore=plan.allowed,
                rng=self._rng,
            )
            tier, propensity, probs = sel.arm, sel.propensity, sel.probabilities
            chosen_by = "exploration" if sel.explored else self.name
            reason = _reason(self.name, sel, plan)
        own = self.bandit(req.tenant) is not None
        features = decision_features(
            f,
            model_version=self.model_version,
            quality_weight=plan.quality_weight,
            quality_floor=plan.quality_floor,
            cheapest_meeting_floor=plan.cheapest_meeting_floor,
            chosen_by=chosen_by,
            prior=prior,  # the residual's base: update() needs it (a Reward has no predictions)
            estimate={n: round(v, _ROUND) for n, v in plan.estimate.items()},
            action_probs={n: round(p, 6) for n, p in probs.items() if p > 0},
            tier_costs=costs,
            cost_norm=round(costs.get(tier, 0.0) / (max(costs.values()) or 1.0), _ROUND),
            bandit={
                "algorithm": self.name,
                "state": "tenant" if own else "prior",
                "updates": plan.bandit.updates,
            },
        )
        return Decision(
            tier=tier,
            policy=self.name,
            reason=reason,
            propensity=propensity,
            features=features,
            predicted=self._predicted(plan),
        )

    def _predicted(self, plan: _Plan) -> dict[str, float]:
        """P(correct) per tier for Explain, the core's floor-aware fallback and OPE's direct
        model: the tenant's estimate (model + learned correction), in [0, 1]; nothing without a
        sufficiency model (a neutral 0.5 is no prediction)."""
        if self._model is None:
            return {}
        return {n: round(min(max(v, 0.0), 1.0), _ROUND) for n, v in plan.estimate.items()}

    def action_probabilities(
        self,
        features: Mapping[str, Any],
        *,
        tenant: str,
        predicted: Mapping[str, float] | None = None,
        tier_costs: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Each tier's probability of being chosen for a logged decision (replay, no request).

        Reads ``features["context"]``, the tenant policy the core recorded
        (``features["tenant_policy"]``), the tiers and their costs (``features["tier_costs"]``,
        else ``tier_costs``) and the model's P(correct) (``features["prior"]``, else
        ``predicted``, else :data:`NEUTRAL_P`). Uses the tenant's *current* state: the policy
        as it would route today. ValueError when the features lack what the replay needs.
        """
        x = context_from_summary(dict(features))
        if x is None:
            raise ValueError(
                f"the decision has no usable features['context'] ({CONTEXT_DIM} numbers, "
                f"features version {FEATURES_VERSION}): {self.name} cannot replay it"
            )
        costs = features.get("tier_costs") or tier_costs
        if not isinstance(costs, Mapping) or not costs:
            raise ValueError("the decision records no tier costs and none were given")
        costs = {str(k): float(v) for k, v in costs.items()}
        recorded = features.get("prior") or predicted or {}
        prior = {n: float(recorded.get(n, NEUTRAL_P)) for n in costs}
        plan = self._plan(tenant, _rounded(x), prior, costs, features.get("tenant_policy"))
        return plan.bandit.probabilities(
            plan.x, plan.eligible, base=plan.base, epsilon=plan.epsilon, explore=plan.allowed
        )

    # ---- learning --------------------------------------------------------------------------

    def update(self, reward: Reward) -> None:
        """Learn from one feedback; rewards that cannot be used are logged and skipped."""
        feats = reward.features
        x = context_from_summary(feats)
        prior = feats.get("prior")
        base = prior.get(reward.tier) if isinstance(prior, Mapping) else None
        try:
            score = clip_score(reward.score)
        except ValueError as exc:
            self._skip(reward, str(exc))
            return
        if x is None or not isinstance(base, int | float):
            self._skip(reward, "its decision recorded no bandit context (another policy?)")
            return
        bandit = self.bandit(reward.tenant, create=True)
        if bandit is None:
            self._skip(reward, "the tenant is over policy.bandit_max_tenants")
            return
        bandit.update(reward.tier, _rounded(x), score - float(base))
        self._maybe_save(reward.tenant, bandit)

    def _skip(self, reward: Reward, why: str) -> None:
        self.skipped_updates += 1
        log.info(
            "%s: feedback on %s not learned from: %s",
            self.name,
            reward.request_id,
            why,
            extra={"request_id": reward.request_id, "tenant": reward.tenant},
        )


def _rounded(values: Any) -> npt.NDArray[np.float64]:
    """A context as the decision records it (4 decimals), so replays see the same numbers."""
    return np.asarray(values, dtype=np.float64).round(_ROUND)


def _tenant_terms(
    tp: TenantPolicy | Mapping[str, Any] | None, default_epsilon: float
) -> tuple[float, float, set[str], float]:
    """(λ, floor, allowed tiers, ε) from a TenantPolicy or its recorded summary."""
    if tp is None:
        return 0.0, 0.0, set(), default_epsilon
    if isinstance(tp, TenantPolicy):
        explore: Any = tp.exploration
        explore = None if explore is None else {"algorithm": explore[0], "rate": explore[1]}
        lam, floor, allowed = tp.quality_weight, tp.quality_floor, tp.allowed_tiers
    else:
        explore = tp.get("exploration")
        lam = float(tp.get("quality_weight") or 0.0)
        floor = float(tp.get("quality_floor") or 0.0)
        allowed = tuple(tp.get("allowed_tiers") or ())
    eps = default_epsilon
    if isinstance(explore, Mapping):
        eps = 0.0 if explore.get("algorithm") == "none" else float(explore.get("rate") or 0.0)
    return float(lam), float(floor), set(allowed), eps


def _reason(name: str, sel: Selection, plan: _Plan) -> str:
    if sel.explored:
        return f"{name}: exploration (ε={plan.epsilon:g}) drew {sel.arm}"
    p = plan.estimate[sel.arm]
    floor_note = "" if plan.cheapest_meeting_floor else "; no tier meets the quality floor"
    return f"{name}: best estimated value, P̂={p:.2f}, p={sel.propensity:.2f}{floor_note}"


@register_policy("linucb")
def _linucb(settings: PolicySettings) -> BanditPolicy:
    return BanditPolicy(settings, "linucb")


@register_policy("lints")
def _lints(settings: PolicySettings) -> BanditPolicy:
    return BanditPolicy(settings, "lints")
