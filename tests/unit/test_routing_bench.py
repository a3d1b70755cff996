"""The routing benchmark's accounting: oracle, gap closed, relative costs, the shift replay."""

from __future__ import annotations

import pytest

from foveal.bench.routing import assemble, oracle_tier
from foveal.bench.routing_shift import _crossing, _moving, run_shift
from foveal.bench.routing_stack import TIERS, Answer, image_data_uri
from foveal.bench.suite.families import generate


class _S:
    def __init__(self, family: str) -> None:
        self.family = family


def _answers(
    correct_by_tier: dict[str, list[bool]], pool_s: dict[str, float]
) -> dict[str, list[Answer]]:
    served = {}
    for t in TIERS:
        served[f"pinned {t}"] = [
            Answer(i, t, t, "x", ok, pool_s[t], 1.0, None)
            for i, ok in enumerate(correct_by_tier[t])
        ]
    return served


def test_oracle_is_the_cheapest_correct_tier_or_the_cheapest_when_none_is() -> None:
    from foveal.bench.routing import Outcome

    row = {t: Outcome(0, t, t in ("t16", "t256"), 0.0, 0.0, (t,)) for t in TIERS}
    assert oracle_tier(row) == "t16"
    none = {t: Outcome(0, t, False, 0.0, 0.0, (t,)) for t in TIERS}
    assert oracle_tier(none) == "t1"


def test_assemble_costs_accuracy_and_gap() -> None:
    # request 0: every tier right; 1: only t256 right; 2: nobody; 3: t4 and up right
    correct = {
        "t1": [True, False, False, False],
        "t4": [True, False, False, True],
        "t16": [True, False, False, True],
        "t64": [True, False, False, True],
        "t256": [True, True, False, True],
    }
    pool_s = {"t1": 0.01, "t4": 0.012, "t16": 0.015, "t64": 0.02, "t256": 0.04}
    served = _answers(correct, pool_s)
    # a routed strategy: t1, t256, t1, t4 (the oracle's choices)
    choice = ["t1", "t256", "t1", "t4"]
    served["smart"] = [
        Answer(i, t, t, "x", correct[t][i], pool_s[t], 1.0, None) for i, t in enumerate(choice)
    ]
    engine = {f"pinned {t}": dict.fromkeys(TIERS, 0.0) | {t: 4 * pool_s[t] / 2} for t in TIERS}
    engine["smart"] = dict.fromkeys(TIERS, 0.01)
    flops = {t: float(int(t[1:])) for t in TIERS}
    samples = [_S("a"), _S("a"), _S("b"), _S("b")]
    res = assemble(served, engine, flops, samples)
    by = {r["name"]: r for r in res["strategies"]}
    assert res["best_fixed_tier"] == "t256"
    assert by["fixed t256"]["accuracy"] == pytest.approx(0.75)
    assert by["fixed t256"]["cost_pool_s"] == pytest.approx(1.0)
    assert by["fixed t256"]["cost_flops"] == pytest.approx(1.0)
    assert by["fixed t1"]["cost_flops"] == pytest.approx(1 / 256)
    assert by["oracle"]["accuracy"] == pytest.approx(0.75)
    # the oracle's tiers: t1, t256, t1 (none right), t4
    assert by["oracle"]["share"] == {"t1": 0.5, "t4": 0.25, "t16": 0.0, "t64": 0.0, "t256": 0.25}
    assert by["oracle"]["cost_flops"] == pytest.approx((1 + 256 + 1 + 4) / (4 * 256))
    assert by["smart"]["accuracy"] == pytest.approx(0.75)
    assert by["smart"]["extra"]["agrees_with_pinned"] == 1.0
    assert by["smart"]["cost_pool_s"] == pytest.approx((0.01 + 0.04 + 0.01 + 0.012) / 0.16)
    # oracle == best fixed here: no gap to close
    assert by["smart"]["gap_closed"] is None
    assert res["per_family_accuracy"]["oracle"] == {"a": 1.0, "b": 0.5}


def test_gap_closed_is_relative_to_best_fixed_and_oracle() -> None:
    correct = {t: [False, False] for t in TIERS}
    correct["t1"] = [True, False]
    correct["t256"] = [False, True]
    pool_s = dict.fromkeys(TIERS, 0.01)
    served = _answers(correct, pool_s)
    served["half"] = [Answer(0, "t1", "t1", "x", True, 0.01, 1.0, None)] + [
        Answer(1, "t1", "t1", "x", False, 0.01, 1.0, None)
    ]
    engine = {k: dict.fromkeys(TIERS, 0.01) for k in served}
    res = assemble(
        served, engine, dict.fromkeys(TIERS, 1.0), [_S("a"), _S("a")], quality_weight=0.1
    )
    by = {r["name"]: r for r in res["strategies"]}
    assert by["oracle"]["accuracy"] == 1.0
    assert by["oracle"]["cost_tokens"] == pytest.approx((1 + 256) / 512)
    assert by["oracle"]["utility"] == pytest.approx(1.0 - 0.1 * (1 + 256) / 512)
    # by utility the best fixed tier is t1 (same accuracy as t256, far cheaper)
    assert by["fixed t1"]["gap_closed_utility"] == pytest.approx(0.0)
    assert by["fixed t256"]["gap_closed_utility"] < 0
    assert by["oracle"]["gap_closed_utility"] == pytest.approx(1.0)
    assert by["fixed t1"]["gap_closed"] == pytest.approx(0.0)  # best fixed: 50%
    assert by["oracle"]["gap_closed"] == pytest.approx(1.0)
    assert by["half"]["gap_closed"] == pytest.approx(0.0)


def test_moving_average_and_crossing() -> None:
    assert _moving([1.0, 0.0, 1.0, 0.0], window=2) == [1.0, 0.5, 0.5, 0.5]
    assert _crossing([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == 1
    assert _crossing([0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.0, 0.0]) == 4  # ahead from event 4 on
    assert _crossing([0.0, 0.0], [1.0, 1.0]) is None


def test_shift_replay_reports_every_policy_and_bounds() -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    fams = ["colour", "existence", "ocr", "document"]
    rows = []
    correct = {}
    for i in range(16):
        s = generate(fams[i % 4], rng, difficulty=0.3)
        rows.append((s.family, image_data_uri(s.image), s.question))
        reading = s.family in ("ocr", "document")
        correct[i] = {t: (t == "t256") if reading else True for t in TIERS}
    res = run_shift(correct=correct, samples=rows, quality_weight=0.1, events_per_phase=60)
    assert res.best_fixed == {"before": "t1", "after": "t256"}
    assert res.oracle["before"] == pytest.approx(1.0 - 0.1 / 256)
    for name, p in res.policies.items():
        assert p["mean_reward_before"] <= res.oracle["before"] + 1e-9, name
        assert p["mean_reward_after"] <= res.oracle["after"] + 1e-9, name
        assert len(res.curves[name]) == 120
    assert {"linucb", "lints", "model"} <= set(res.policies)
