"""LinUCB and linear Thompson sampling: learning, exact propensities, clipping, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from foveal.router.bandits import (
    TARGET_CLIP,
    BanditStateError,
    LinearBandit,
    LinTS,
    LinUCB,
    bandit_from_dict,
    clip_score,
    clip_target,
    prob_max,
    warm_start,
)

ARMS = ["a", "b", "c", "d"]


def _context(rng: np.random.Generator, d: int) -> np.ndarray:
    return np.append(rng.uniform(-1, 1, d - 1), 1.0)  # bias last, as the router's contexts


def _planted_run(bandit: LinearBandit, rounds: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Per-round regret and whether the best arm was chosen, on a planted linear reward."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 0.3, (len(ARMS), bandit.dim))
    choose_rng = np.random.default_rng(1)
    regret, best = np.empty(rounds), np.empty(rounds, dtype=bool)
    for t in range(rounds):
        x = _context(rng, bandit.dim)
        mu = theta @ x
        sel = bandit.select(x, ARMS, rng=choose_rng)
        k = ARMS.index(sel.arm)
        bandit.update(sel.arm, x, mu[k] + rng.normal(0, 0.1))
        regret[t], best[t] = mu.max() - mu[k], k == int(mu.argmax())
    return regret, best


@pytest.mark.parametrize(
    "bandit", [LinUCB(8, alpha=0.5), LinTS(8, noise=0.2)], ids=["linucb", "lints"]
)
def test_learns_a_planted_linear_reward(bandit: LinearBandit) -> None:
    regret, best = _planted_run(bandit, 2500)
    assert regret[-500:].mean() < regret[:500].mean() / 5
    assert best[-500:].mean() > 0.9
    assert bandit.updates == 2500


def test_sherman_morrison_keeps_the_inverse_exact() -> None:
    bandit = LinUCB(6)
    rng = np.random.default_rng(3)
    for _ in range(300):
        bandit.update("a", _context(rng, 6), rng.uniform())
    arm = bandit.arms["a"]
    assert np.allclose(arm.a_inv @ arm.a, np.eye(6), atol=1e-9)
    assert np.allclose(arm.theta, np.linalg.solve(arm.a, arm.b), atol=1e-9)


def test_prob_max_matches_the_closed_form_for_two_arms() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = rng.normal(size=2) * rng.choice([0.01, 1.0, 5.0])
        s = np.exp(rng.normal(size=2) * 2)
        exact = 0.5 * math.erfc(-(m[0] - m[1]) / math.hypot(s[0], s[1]) / math.sqrt(2))
        p = prob_max(m, s)
        assert p.sum() == pytest.approx(1.0)
        assert p[0] == pytest.approx(exact, abs=1e-3)


def test_prob_max_matches_monte_carlo_for_five_arms() -> None:
    rng = np.random.default_rng(1)
    m = np.array([0.10, 0.20, 0.30, 0.25, 0.15])
    s = np.array([0.10, 0.05, 0.20, 0.10, 0.30])
    draws = m + s * rng.standard_normal((400_000, 5))
    mc = np.bincount(draws.argmax(axis=1), minlength=5) / len(draws)
    assert np.abs(prob_max(m, s) - mc).max() < 0.005


@pytest.mark.parametrize("epsilon", [0.0, 0.2])
@pytest.mark.parametrize("cls", [LinUCB, LinTS])
def test_propensities_sum_to_one_and_match_choice_frequencies(
    cls: type[LinearBandit], epsilon: float
) -> None:
    rng = np.random.default_rng(5)
    bandit = cls(4, epsilon=epsilon)
    for _ in range(40):
        arm = ARMS[int(rng.integers(4))]
        bandit.update(arm, _context(rng, 4), rng.uniform())
    x = _context(rng, 4)
    base = {"a": 0.1, "b": 0.12, "c": 0.05, "d": 0.0}
    probs = bandit.probabilities(x, ARMS, base=base)
    assert sum(probs.values()) == pytest.approx(1.0)
    choose = np.random.default_rng(11)
    counts = dict.fromkeys(ARMS, 0)
    n = 6000
    for _ in range(n):
        sel = bandit.select(x, ARMS, base=base, rng=choose)
        assert sel.propensity == pytest.approx(probs[sel.arm])
        assert sel.probabilities == pytest.approx(probs)
        counts[sel.arm] += 1
    for arm in ARMS:
        assert counts[arm] / n == pytest.approx(probs[arm], abs=0.025)
    if cls is LinTS:
        assert sum(p > 0.01 for p in probs.values()) >= 2  # the case is really stochastic


def test_linucb_epsilon_propensity_is_exact() -> None:
    bandit = LinUCB(3, alpha=0.0, epsilon=0.3)
    x = np.array([0.5, -0.2, 1.0])
    probs = bandit.probabilities(x, ARMS, base={"c": 1.0})
    assert probs == pytest.approx({"a": 0.075, "b": 0.075, "c": 0.7 + 0.075, "d": 0.075})
    # exploring over a wider set than the candidates
    probs = bandit.probabilities(x, ["c"], epsilon=0.5, explore=ARMS)
    assert probs == pytest.approx({"a": 0.125, "b": 0.125, "c": 0.625, "d": 0.125})


def test_ties_go_to_the_first_allowed_arm() -> None:
    bandit = LinUCB(3)
    sel = bandit.select(np.array([0.0, 0.0, 1.0]), ["b", "a", "c"])
    assert sel.arm == "b" and sel.propensity == 1.0 and not sel.explored


def test_clipping_bounds_one_feedback() -> None:
    assert clip_score(1e9) == 1.0
    assert clip_score(-3.0) == 0.0
    assert clip_target(-50.0) == -TARGET_CLIP
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            clip_score(bad)
        with pytest.raises(ValueError, match="finite"):
            LinUCB(2).update("a", np.array([0.0, 1.0]), bad)
    huge, one = LinUCB(2), LinUCB(2)
    x = np.array([0.3, 1.0])
    huge.update("a", x, 1e12)
    one.update("a", x, TARGET_CLIP)
    assert np.array_equal(huge.arms["a"].theta, one.arms["a"].theta)


def test_bad_inputs_are_refused_with_clear_errors() -> None:
    bandit = LinTS(3)
    with pytest.raises(ValueError, match=r"shape \(2,\).*\(3,\)"):
        bandit.select(np.zeros(2), ARMS)
    with pytest.raises(ValueError, match="NaN"):
        bandit.update("a", np.array([0.0, math.nan, 1.0]), 0.5)
    with pytest.raises(ValueError, match="at least one"):
        bandit.select(np.zeros(3), [])
    with pytest.raises(ValueError, match="repeat"):
        bandit.select(np.zeros(3), ["a", "a"])
    with pytest.raises(ValueError, match="epsilon"):
        LinUCB(3, epsilon=1.5)


@pytest.mark.parametrize("cls", [LinUCB, LinTS])
def test_state_round_trips_through_json(cls: type[LinearBandit]) -> None:
    rng = np.random.default_rng(2)
    bandit = cls(5, prior_precision=3.0, epsilon=0.1)
    for _ in range(50):
        bandit.update(ARMS[int(rng.integers(4))], _context(rng, 5), rng.uniform())
    payload = json.loads(json.dumps(bandit.to_dict()))
    again = bandit_from_dict(payload, dim=5)
    assert type(again) is cls and again.updates == 50 and again.epsilon == 0.1
    x = _context(rng, 5)
    assert again.probabilities(x, ARMS) == pytest.approx(bandit.probabilities(x, ARMS))
    for name, arm in bandit.arms.items():
        assert np.allclose(again.arms[name].theta, arm.theta, atol=1e-12)
        assert again.arms[name].n == arm.n


def test_state_errors_name_the_problem() -> None:
    payload = LinUCB(4).to_dict()
    payload["arms"] = {"a": {"n": 0, "A": "", "b": ""}}
    with pytest.raises(BanditStateError, match="dimension 4 but the contexts now have 6"):
        LinUCB.from_dict(LinUCB(4).to_dict(), dim=6)
    with pytest.raises(BanditStateError, match="arm 'a' A"):
        LinUCB.from_dict(payload)
    with pytest.raises(BanditStateError, match="version 99"):
        LinUCB.from_dict({**LinUCB(4).to_dict(), "version": 99})
    with pytest.raises(BanditStateError, match="'lints', not 'linucb'"):
        LinUCB.from_dict(LinTS(4).to_dict())
    with pytest.raises(BanditStateError, match="not a bandit state"):
        bandit_from_dict({"format": "other"} | {"algorithm": "linucb"})
    with pytest.raises(BanditStateError, match="unknown bandit algorithm"):
        bandit_from_dict({"algorithm": "greedy"})


def test_warm_start_sets_the_prior_mean_and_its_weight() -> None:
    rng = np.random.default_rng(4)
    x = np.array([_context(rng, 6) for _ in range(400)])
    theta = rng.normal(0, 0.3, (6, 3))
    rewards = x @ theta  # predicted reward of 3 arms, linear in the context
    light, heavy = LinUCB(6, prior_precision=1.0), LinUCB(6, prior_precision=1.0)
    warm_start(light, x, rewards, ["a", "b", "c"], weight=5)
    warm_start(heavy, x, rewards, ["a", "b", "c"], weight=500)
    probe = _context(rng, 6)
    means, widths_light = light.estimate(probe, ["a", "b", "c"])
    heavy_means, widths_heavy = heavy.estimate(probe, ["a", "b", "c"])
    assert np.allclose(heavy_means, probe @ theta, atol=0.01)
    assert np.all(widths_heavy < widths_light / 5)
    assert light.updates == 0 and all(arm.n == 0 for arm in light.arms.values())
    with pytest.raises(ValueError, match=r"rewards must be \(400, 2\)"):
        warm_start(light, x, rewards, ["a", "b"])
