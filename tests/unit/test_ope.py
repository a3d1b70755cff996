"""Off-policy evaluation on synthetic logs whose true values are known."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from foveal.router.ope import (
    Evaluation,
    LoggedDecision,
    OpeError,
    PolicyEstimate,
    estimate,
    evaluate,
    propensity_of,
)
from foveal.store.records import DecisionRecord, FeedbackRecord

TIERS = ["t1", "t4", "t16"]
COSTS = {"t1": 1.0, "t4": 4.0, "t16": 16.0}
# P(score = 1) per request kind and tier: "read" needs t16, "colour" works everywhere
MEANS = {"read": {"t1": 0.1, "t4": 0.4, "t16": 0.9}, "colour": {"t1": 0.8, "t4": 0.85, "t16": 0.9}}
LOGGING = {  # a stochastic logging policy with full support
    "read": {"t1": 0.2, "t4": 0.3, "t16": 0.5},
    "colour": {"t1": 0.6, "t4": 0.3, "t16": 0.1},
}


class TablePolicy:
    """A candidate whose probabilities depend only on the recorded request kind."""

    name = "table"

    def __init__(self, table: Mapping[str, Mapping[str, float]]) -> None:
        self.table = table

    def action_probabilities(
        self,
        features: Mapping[str, Any],
        *,
        tenant: str,
        predicted: Mapping[str, float] | None = None,
        tier_costs: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        if "kind" not in features:
            raise ValueError("no kind recorded")
        return dict(self.table[features["kind"]])


CANDIDATE = TablePolicy({"read": {"t16": 1.0}, "colour": {"t1": 0.9, "t4": 0.1}})


def _true_value(table: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    acc = cost = 0.0
    for kind in MEANS:  # kinds are equally likely
        for tier, p in table[kind].items():
            acc += 0.5 * p * MEANS[kind][tier]
            cost += 0.5 * p * COSTS[tier]
    return acc, cost


def _log(
    n: int,
    seed: int,
    *,
    predicted: Mapping[str, Mapping[str, float]] | None = MEANS,
    logging: Mapping[str, Mapping[str, float]] = LOGGING,
) -> list[LoggedDecision]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = "read" if rng.random() < 0.5 else "colour"
        probs = logging[kind]
        tier = TIERS[rng.choice(3, p=[probs.get(t, 0.0) for t in TIERS])]
        score = float(rng.random() < MEANS[kind][tier])
        rows.append(
            LoggedDecision(
                request_id=f"r{i}",
                tenant="acme",
                action=tier,
                propensity=probs[tier],
                score=score,
                cost=COSTS[tier],
                features={"kind": kind, "tier_costs": COSTS},
                predicted=dict(predicted[kind]) if predicted else {},
            )
        )
    return rows


def _by_name(result: Evaluation) -> dict[str, PolicyEstimate]:
    return {e.estimator: e for e in result.estimates}


def test_estimates_cover_the_true_value() -> None:
    true_acc, true_cost = _true_value(CANDIDATE.table)
    result = evaluate(CANDIDATE, _log(4000, seed=1))
    est = _by_name(result)
    for name in ("ips", "snips", "dr"):
        e = est[name]
        assert e.accuracy.low <= true_acc <= e.accuracy.high, (name, e.accuracy, true_acc)
        assert e.cost.low <= true_cost <= e.cost.high, (name, e.cost, true_cost)
        assert e.n == 4000 and 0 < e.ess < 4000
    # the logging policy's own value is a different number: the estimate is not the log mean
    logged_acc, _ = _true_value(LOGGING)
    assert est["logged"].accuracy.low <= logged_acc <= est["logged"].accuracy.high
    assert abs(true_acc - logged_acc) > 3 * est["dr"].accuracy.se


def test_doubly_robust_has_lower_variance_with_a_good_model() -> None:
    est = _by_name(evaluate(CANDIDATE, _log(4000, seed=2)))
    assert est["dr"].accuracy.se < 0.7 * est["ips"].accuracy.se
    assert est["dr"].cost.se < 0.6 * est["ips"].cost.se  # nominal tier costs are exact


def test_doubly_robust_survives_a_wrong_model() -> None:
    wrong = {"read": dict.fromkeys(TIERS, 0.5), "colour": dict.fromkeys(TIERS, 0.1)}
    true_acc, _ = _true_value(CANDIDATE.table)
    dr = _by_name(evaluate(CANDIDATE, _log(4000, seed=3, predicted=wrong)))["dr"]
    assert dr.accuracy.low <= true_acc <= dr.accuracy.high


def test_without_predictions_dr_uses_leave_one_out_tier_means() -> None:
    true_acc, _ = _true_value(CANDIDATE.table)
    dr = _by_name(evaluate(CANDIDATE, _log(4000, seed=4, predicted=None)))["dr"]
    assert dr.accuracy.low <= true_acc <= dr.accuracy.high


def test_evaluating_the_logging_policy_gives_back_the_log() -> None:
    result = _by_name(evaluate(TablePolicy(LOGGING), _log(2000, seed=5)))
    assert result["ips"].ess == pytest.approx(2000)  # every weight is 1
    assert result["ips"].accuracy.value == pytest.approx(result["logged"].accuracy.value)
    assert result["snips"].accuracy.value == pytest.approx(result["logged"].accuracy.value)


def test_bootstrap_intervals_agree_with_the_normal_ones() -> None:
    rows = _log(1500, seed=6)
    normal = _by_name(evaluate(CANDIDATE, rows))
    boot = _by_name(evaluate(CANDIDATE, rows, bootstrap=400, seed=1))
    for name in ("ips", "snips", "dr"):
        assert boot[name].accuracy.value == normal[name].accuracy.value
        assert boot[name].accuracy.se == pytest.approx(normal[name].accuracy.se, rel=0.2)
        width = boot[name].accuracy.high - boot[name].accuracy.low
        assert width == pytest.approx(
            normal[name].accuracy.high - normal[name].accuracy.low, rel=0.25
        )


def test_support_flags_tiers_a_deterministic_logger_never_tried() -> None:
    greedy = {"read": {"t16": 1.0}, "colour": {"t1": 1.0}}
    rows = _log(500, seed=7, logging=greedy)
    same = evaluate(TablePolicy(greedy), rows)
    assert same.support == pytest.approx(1.0)
    other = evaluate(TablePolicy({"read": {"t4": 1.0}, "colour": {"t4": 1.0}}), rows)
    assert other.support == pytest.approx(0.0)
    ips = _by_name(other)["ips"]
    assert ips.accuracy.value == 0.0 and ips.ess == 0.0  # no logged row says anything


def test_rows_that_cannot_be_replayed_are_counted_and_pinned_ones_left_out() -> None:
    rows = _log(300, seed=8)
    blind = LoggedDecision("x1", "acme", "t1", 1.0, 1.0, 1.0, {}, {})
    pinned = LoggedDecision("x2", "acme", "t4", 1.0, 1.0, 4.0, {"kind": "read"}, {}, pinned=True)
    result = evaluate(CANDIDATE, [*rows, blind, pinned])
    assert result.n_logged == 302
    assert result.skipped == {"no kind recorded": 1, "pinned by the request": 1}
    assert _by_name(result)["dr"].n == 300


def test_records_from_the_store_are_read_as_decisions_with_feedback() -> None:
    d = DecisionRecord(
        "r1", "acme", "t16", "t4", "auto", "lints", "why", 0.25, {"kind": "read"}, {}, cost=16.0
    )
    result = evaluate(CANDIDATE, [(d, FeedbackRecord("r1", "acme", 1.0))], tier_costs=COSTS)
    assert result.tiers[0] == "t4"  # the action is the tier the policy chose, not the fallback
    logged = _by_name(result)["logged"]
    assert logged.accuracy.value == 1.0 and logged.cost.value == 16.0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_missing_or_zero_propensities_are_refused(bad: float) -> None:
    rows = _log(10, seed=9)
    rows[3] = LoggedDecision("r3", "acme", "t1", bad, 1.0, 1.0, {"kind": "read"}, {})
    with pytest.raises(OpeError, match=r"1 of 10 logged decisions have no usable propensity.*'r3'"):
        evaluate(CANDIDATE, rows)


def test_nothing_to_evaluate_is_a_clear_error() -> None:
    with pytest.raises(OpeError, match="no logged decisions with feedback"):
        evaluate(CANDIDATE, [])
    blind = LoggedDecision("x1", "acme", "t1", 1.0, 1.0, 1.0, {}, {})
    with pytest.raises(OpeError, match="none of the 1 logged decisions could be replayed"):
        evaluate(CANDIDATE, [blind])


def test_a_policy_that_cannot_replay_is_named() -> None:
    class Opaque:
        name = "rules"

    with pytest.raises(OpeError, match="'rules' cannot be evaluated off-policy"):
        propensity_of(Opaque(), {}, tenant="acme")
    with pytest.raises(OpeError, match="'rules' cannot be evaluated"):
        evaluate(Opaque(), _log(5, seed=10))


def test_probabilities_that_do_not_sum_to_one_are_refused() -> None:
    broken = TablePolicy({"read": {"t1": 0.5}, "colour": {"t1": 0.5}})
    with pytest.raises(ValueError, match="do not sum to 1"):
        propensity_of(broken, {"kind": "read"}, tenant="acme")


def test_estimate_without_a_direct_model_makes_dr_equal_ips() -> None:
    rng = np.random.default_rng(11)
    n = 200
    actions = rng.integers(0, 2, n)
    out = estimate(rng.random(n), np.full(n, 0.5), np.tile([0.3, 0.7], (n, 1)), actions)
    assert out["dr"][0].value == pytest.approx(out["ips"][0].value)
    assert out["dr"][0].se == pytest.approx(out["ips"][0].se)
