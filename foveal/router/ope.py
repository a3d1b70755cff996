"""Off-policy evaluation: what a candidate policy would score, from logged decisions.

Every logged decision that got feedback is a tuple (context x, chosen tier a, the logging
policy's probability p of choosing a, the score r in [0, 1], the cost c). For a candidate
policy π with probabilities π(·|x), with ``w = π(a|x) / p``:

* **IPS** (inverse propensity scoring): ``mean(w·r)``: unbiased when p > 0 wherever π > 0;
* **SNIPS** (self-normalised): ``Σ w·r / Σ w``: slightly biased, much less variance;
* **DR** (doubly robust): ``mean(Σ_a π(a|x)·q(x,a) + w·(r - q(x,a)))`` with a direct model q:
  unbiased if either the propensities or q are right, and lower variance when q is good.
  q for accuracy is the P(correct) per tier recorded with the decision
  (``DecisionRecord.predicted``: the sufficiency model's, or a bandit's estimate, made before
  the decision's own feedback) when present, else the tier's mean score over the log
  (leave-one-out, so a row never predicts itself); q for cost is the tier's cost weight.

Accuracy is the mean feedback score; cost the mean cost weight of the answering tier (times
attempts). Intervals are normal approximations (``value ± z·se``; SNIPS by the delta method)
or, with ``bootstrap=B``, percentile intervals of B resamples. The effective sample size
``(Σw)² / Σw²`` says how many logged decisions the estimate is really worth.

**Replay.** The request itself is not stored, so a candidate is replayed from what its
decision recorded: :func:`propensity_of` calls the policy's
``action_probabilities(features, tenant=, predicted=, tier_costs=)`` (the bandit policies
have it: they rebuild the choice from ``features["context"]``, the recorded tenant policy,
tier costs and model predictions). Limits: rows without a usable context (e.g. logged by the
rules policy, or by another features version) are skipped and counted; a learning candidate
is evaluated as it is now (its current state, frozen), not as it would have evolved; pinned
requests are left out (no policy chose them); when the logging policy never tried a tier
the candidate would pick (e.g. a deterministic logger), IPS counts those rows as zero and DR
relies on q there: the ``support`` figure (the candidate's probability mass on tiers the
logger could have chosen) says how much that matters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from foveal.store.records import DecisionRecord, FeedbackRecord

__all__ = [
    "ESTIMATORS",
    "Evaluation",
    "Interval",
    "LoggedDecision",
    "OpeError",
    "PolicyEstimate",
    "ReplayablePolicy",
    "estimate",
    "evaluate",
    "propensity_of",
]

Array = npt.NDArray[np.float64]
ESTIMATORS = ("logged", "ips", "snips", "dr")
_MIN_SUPPORT_P = 1e-9


class OpeError(ValueError):
    """Logged data that cannot be evaluated (none, or propensities missing or zero)."""


class ReplayablePolicy(Protocol):
    name: str

    def action_probabilities(
        self,
        features: Mapping[str, Any],
        *,
        tenant: str,
        predicted: Mapping[str, float] | None = None,
        tier_costs: Mapping[str, float] | None = None,
    ) -> dict[str, float]: ...


@dataclass(frozen=True, slots=True)
class Interval:
    value: float
    low: float
    high: float
    se: float


@dataclass(frozen=True, slots=True)
class PolicyEstimate:
    estimator: str  # one of ESTIMATORS ("logged": what the logging policies actually got)
    accuracy: Interval
    cost: Interval
    n: int
    ess: float  # effective sample size


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One decision with feedback, as the estimators need it."""

    request_id: str
    tenant: str
    action: str  # the tier the logging policy chose
    propensity: float  # its probability of choosing it
    score: float
    cost: float | None
    features: Mapping[str, Any]
    predicted: Mapping[str, float]
    pinned: bool = False

    @classmethod
    def from_records(cls, d: DecisionRecord, f: FeedbackRecord) -> LoggedDecision:
        return cls(
            request_id=d.request_id,
            tenant=d.tenant,
            action=d.chosen_tier,
            propensity=d.propensity,
            score=f.score,
            cost=d.cost,
            features=d.features,
            predicted=d.predicted,
            pinned=d.requested_model != "auto",
        )


@dataclass(frozen=True, slots=True)
class Evaluation:
    policy: str
    estimates: list[PolicyEstimate]
    n_logged: int  # decisions with feedback read
    skipped: dict[str, int] = field(default_factory=dict)  # why -> rows left out
    support: float | None = None  # candidate mass on tiers the logger could choose
    tiers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def interval(i: Interval) -> dict[str, float]:
            return {"value": i.value, "low": i.low, "high": i.high, "se": i.se}

        return {
            "policy": self.policy,
            "n_logged": self.n_logged,
            "skipped": dict(self.skipped),
            "support": self.support,
            "tiers": list(self.tiers),
            "estimates": [
                {
                    "estimator": e.estimator,
                    "accuracy": interval(e.accuracy),
                    "cost": interval(e.cost),
                    "n": e.n,
                    "ess": e.ess,
                }
                for e in self.estimates
            ],
        }


def propensity_of(
    policy: Any,
    features: Mapping[str, Any],
    *,
    tenant: str,
    predicted: Mapping[str, float] | None = None,
    tier_costs: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The candidate's probability of each tier for a logged decision (see module docstring).

    ValueError when this decision cannot be replayed; OpeError when the policy cannot replay
    any decision (it has no ``action_probabilities``).
    """
    replay = getattr(policy, "action_probabilities", None)
    if replay is None:
        raise OpeError(
            f"policy {getattr(policy, 'name', policy)!r} cannot be evaluated off-policy: it "
            "needs the request itself, which is not stored (policies that replay from "
            "recorded features implement action_probabilities)"
        )
    probs: dict[str, float] = replay(
        features, tenant=tenant, predicted=predicted, tier_costs=tier_costs
    )
    total = sum(probs.values())
    if not probs or not math.isfinite(total) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"the policy's probabilities do not sum to 1 ({probs})")
    return probs


def _interval(value: float, se: float, z: float) -> Interval:
    return Interval(value, value - z * se, value + z * se, se)


def _bounded(i: Interval, bounds: tuple[float, float]) -> Interval:
    """The interval's ends kept within what the metric can be (the estimate is left as is)."""
    lo, hi = bounds
    return Interval(i.value, min(max(i.low, lo), hi), max(min(i.high, hi), lo), i.se)


def _bootstrap(
    stat: Any, columns: Sequence[Array], b: int, z: float, rng: np.random.Generator
) -> tuple[float, float, float]:
    """(se, low, high) of ``stat(*columns)`` over ``b`` resamples (percentile interval)."""
    n = columns[0].size
    level = 2 * (1 - _norm_cdf(z))
    values = np.empty(b)
    chunk = max(1, 2_000_000 // max(n, 1))  # bound memory: chunk rows of (n) indices
    for start in range(0, b, chunk):
        idx = rng.integers(0, n, size=(min(chunk, b - start), n))
        values[start : start + idx.shape[0]] = stat(*(c[idx] for c in columns))
    low, high = np.quantile(values, [level / 2, 1 - level / 2])
    return float(values.std(ddof=1)), float(low), float(high)


def _norm_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def estimate(
    rewards: npt.ArrayLike,
    propensities: npt.ArrayLike,
    target: npt.ArrayLike,
    actions: npt.ArrayLike,
    direct: npt.ArrayLike | None = None,
    *,
    z: float = 1.96,
    bootstrap: int = 0,
    rng: np.random.Generator | None = None,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> dict[str, tuple[Interval, float]]:
    """Every estimator's (interval, effective sample size) of one metric.

    ``rewards`` (n,), ``propensities`` (n,) of the logged ``actions`` (n,) (column indices
    into ``target``), ``target`` (n, K) the candidate's probabilities, ``direct`` (n, K) the
    direct model q (default: zero, which makes DR equal to IPS). Interval ends are kept within
    ``bounds`` (what the metric can be: [0, 1] for accuracy); the estimates themselves are not
    clipped, so an IPS estimate above 1 shows its variance.
    """
    r = np.asarray(rewards, dtype=np.float64)
    p = np.asarray(propensities, dtype=np.float64)
    pi = np.asarray(target, dtype=np.float64)
    a = np.asarray(actions, dtype=np.int64)
    n = r.size
    if n == 0:
        raise OpeError("no logged decisions to evaluate")
    if not (np.all(np.isfinite(p)) and np.all(p > 0) and np.all(p <= 1 + 1e-9)):
        raise OpeError("propensities must be in (0, 1]")
    q = np.zeros_like(pi) if direct is None else np.asarray(direct, dtype=np.float64)
    rows = np.arange(n)
    w = pi[rows, a] / p
    ess = float(w.sum() ** 2 / (w * w).sum()) if np.any(w > 0) else 0.0
    dr_terms = (pi * q).sum(axis=1) + w * (r - q[rows, a])
    sw = w.sum()
    snips = float((w * r).sum() / sw) if sw > 0 else 0.0
    snips_se = float(math.sqrt(((w * (r - snips)) ** 2).sum()) / sw) if sw > 0 else math.inf
    root_n = math.sqrt(n)

    def sd(x: Array) -> float:
        return float(x.std(ddof=1)) if n > 1 else math.inf

    out = {
        "logged": (_interval(float(r.mean()), sd(r) / root_n, z), float(n)),
        "ips": (_interval(float((w * r).mean()), sd(w * r) / root_n, z), ess),
        "snips": (_interval(snips, snips_se, z), ess),
        "dr": (_interval(float(dr_terms.mean()), sd(dr_terms) / root_n, z), ess),
    }
    if bootstrap > 0 and n > 1:
        gen = rng or np.random.default_rng(0)

        def ratio(wr: Array, ww: Array) -> Array:
            den = ww.sum(axis=1)
            result: Array = np.where(den > 0, wr.sum(axis=1) / np.where(den > 0, den, 1), 0.0)
            return result

        def mean(x: Array) -> Array:
            result: Array = x.mean(axis=1)
            return result

        columns = {"logged": [r], "ips": [w * r], "dr": [dr_terms]}
        for name, cols in columns.items():
            se, low, high = _bootstrap(mean, cols, bootstrap, z, gen)
            out[name] = (Interval(out[name][0].value, low, high, se), out[name][1])
        se, low, high = _bootstrap(ratio, [w * r, w], bootstrap, z, gen)
        out["snips"] = (Interval(snips, low, high, se), ess)
    return {name: (_bounded(i, bounds), e) for name, (i, e) in out.items()}


def _loo_tier_means(values: Array, actions: npt.NDArray[np.int64], k: int) -> Array:
    """(n, k): each tier's mean of ``values`` over the other rows (overall mean if none)."""
    n = values.size
    sums = np.bincount(actions, weights=values, minlength=k)
    counts = np.bincount(actions, minlength=k).astype(np.float64)
    overall = float(values.mean()) if n else 0.0
    s = np.tile(sums.astype(np.float64), (n, 1))
    c = np.tile(counts, (n, 1))
    rows = np.arange(n)
    s[rows, actions] -= values
    c[rows, actions] -= 1
    out: Array = np.where(c > 0, s / np.where(c > 0, c, 1), overall)
    return out


def evaluate(
    policy: Any,
    rows: Iterable[tuple[DecisionRecord, FeedbackRecord] | LoggedDecision],
    *,
    tier_costs: Mapping[str, float] | None = None,
    z: float = 1.96,
    bootstrap: int = 0,
    seed: int = 0,
) -> Evaluation:
    """Estimate ``policy``'s accuracy and cost from logged decisions with feedback.

    ``tier_costs`` (tier -> cost weight) is used for decisions that did not record theirs.
    OpeError when nothing can be evaluated or a logged propensity is missing or not in (0, 1].
    """
    name = str(getattr(policy, "name", policy))
    logged: list[LoggedDecision] = []
    probs: list[dict[str, float]] = []
    skipped: dict[str, int] = {}
    n_logged = 0
    bad: list[str] = []
    for row in rows:
        item = row if isinstance(row, LoggedDecision) else LoggedDecision.from_records(*row)
        n_logged += 1
        p = item.propensity
        if p is None or not math.isfinite(p) or not 0 < p <= 1:
            bad.append(item.request_id)
            continue
        if item.pinned:
            skipped["pinned by the request"] = skipped.get("pinned by the request", 0) + 1
            continue
        try:
            pr = propensity_of(
                policy,
                item.features,
                tenant=item.tenant,
                predicted=item.predicted,
                tier_costs=tier_costs,
            )
        except OpeError:
            raise
        except ValueError as exc:
            why = str(exc)
            skipped[why] = skipped.get(why, 0) + 1
            continue
        logged.append(item)
        probs.append(pr)
    if bad:
        raise OpeError(
            f"{len(bad)} of {n_logged} logged decisions have no usable propensity (missing, "
            f"zero or above 1), e.g. {bad[0]!r}: inverse propensity weighting needs the "
            "probability the logging policy had of its choice"
        )
    if n_logged == 0:
        raise OpeError("no logged decisions with feedback to evaluate")
    if not logged:
        reasons = "; ".join(f"{k} ({v})" for k, v in skipped.items())
        raise OpeError(f"none of the {n_logged} logged decisions could be replayed: {reasons}")
    return _evaluate_rows(name, logged, probs, skipped, n_logged, tier_costs, z, bootstrap, seed)


def _evaluate_rows(
    name: str,
    logged: list[LoggedDecision],
    probs: list[dict[str, float]],
    skipped: dict[str, int],
    n_logged: int,
    tier_costs: Mapping[str, float] | None,
    z: float,
    bootstrap: int,
    seed: int,
) -> Evaluation:
    tiers: list[str] = []
    for item, pr in zip(logged, probs, strict=True):
        for t in (item.action, *pr):
            if t not in tiers:
                tiers.append(t)
    index = {t: i for i, t in enumerate(tiers)}
    n, k = len(logged), len(tiers)
    pi = np.zeros((n, k))
    actions = np.empty(n, dtype=np.int64)
    for i, (item, pr) in enumerate(zip(logged, probs, strict=True)):
        for t, v in pr.items():
            pi[i, index[t]] = v
        actions[i] = index[item.action]
    p = np.array([item.propensity for item in logged])
    scores = np.clip(np.array([item.score for item in logged], dtype=np.float64), 0.0, 1.0)
    nominal = [_costs(item, tier_costs) for item in logged]
    costs = np.array(
        [
            item.cost if item.cost is not None else nominal[i].get(item.action, math.nan)
            for i, item in enumerate(logged)
        ],
        dtype=np.float64,
    )
    known_cost = np.isfinite(costs)
    costs = np.where(known_cost, costs, 0.0)
    loo_score = _loo_tier_means(scores, actions, k)
    loo_cost = _loo_tier_means(costs, actions, k)
    q_score = loo_score.copy()
    q_cost = loo_cost.copy()
    for i, item in enumerate(logged):
        for t, j in index.items():
            if t in item.predicted:
                q_score[i, j] = float(item.predicted[t])
            if t in nominal[i]:
                q_cost[i, j] = nominal[i][t]
    rng = np.random.default_rng(seed)
    acc = estimate(
        scores, p, pi, actions, q_score, z=z, bootstrap=bootstrap, rng=rng, bounds=(0.0, 1.0)
    )
    cost = estimate(
        costs, p, pi, actions, q_cost, z=z, bootstrap=bootstrap, rng=rng, bounds=(0.0, math.inf)
    )
    estimates = [PolicyEstimate(e, acc[e][0], cost[e][0], n, acc[e][1]) for e in ESTIMATORS]
    return Evaluation(name, estimates, n_logged, skipped, _support(logged, pi, index), tiers)


def _costs(item: LoggedDecision, fallback: Mapping[str, float] | None) -> dict[str, float]:
    recorded = item.features.get("tier_costs")
    source = recorded if isinstance(recorded, Mapping) and recorded else (fallback or {})
    return {str(t): float(c) for t, c in source.items()}


def _support(logged: Sequence[LoggedDecision], pi: Array, index: Mapping[str, int]) -> float | None:
    """Mean candidate probability on tiers the logging policy could choose (rows where the
    logging distribution is known: recorded ``action_probs``, or a deterministic choice)."""
    covered: list[float] = []
    for i, item in enumerate(logged):
        recorded = item.features.get("action_probs")
        if isinstance(recorded, Mapping) and recorded:
            possible = {str(t) for t, v in recorded.items() if float(v) > _MIN_SUPPORT_P}
        elif item.propensity >= 1.0 - 1e-9:
            possible = {item.action}
        else:
            continue
        covered.append(sum(float(pi[i, j]) for t, j in index.items() if t in possible))
    return float(np.mean(covered)) if covered else None
