"""The linucb and lints routing policies: learning, isolation, clipping, persistence, replay."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foveal.config import PolicySettings, load_settings
from foveal.pools.catalog import Catalog
from foveal.router.bandit_policy import NEUTRAL_P, BanditPolicy
from foveal.router.features import CONTEXT_DIM, FEATURE_NAMES
from foveal.router.ope import evaluate
from foveal.router.policies import Decision, DecisionContext, Reward, make_policy
from foveal.router.requests import ChatRequest, ImagePart, Message, TextPart
from foveal.router.sufficiency import SufficiencyModel
from foveal.router.tenant_policy import TenantPolicy
from foveal.store import Store
from foveal.store.records import DecisionRecord, FeedbackRecord
from foveal.testing.images import png_data_uri

CATALOG = Catalog.from_settings(load_settings().tiers)  # t1 t4 t16 t64 t256, cost = tokens
TIERS = CATALOG.names
COSTS = {t.name: t.cost_weight for t in CATALOG.tiers}
LAM = 0.5
TP = TenantPolicy(source="test", quality_weight=LAM)
KINDS = {  # prompt, image colour, P(score = 1) per tier
    "read": ("read the text on the sign", (10, 10, 10), [0.05, 0.05, 0.1, 0.95, 0.95]),
    "colour": ("what colour is it", (200, 30, 30), [0.95, 0.95, 0.95, 0.95, 0.95]),
}
_URIS = {kind: png_data_uri(64, 64, colour) for kind, (_, colour, _) in KINDS.items()}


def _request(kind: str, rid: str, tenant: str = "acme", model: str = "auto") -> ChatRequest:
    text, _, _ = KINDS[kind]
    uri = _URIS[kind]
    image = ImagePart(uri, "image/png", 64, 64, len(uri))
    return ChatRequest(rid, tenant, model, (Message("user", (TextPart(text), image)),), 16)


def _value(kind: str, tier: str) -> float:
    return KINDS[kind][2][TIERS.index(tier)] - LAM * COSTS[tier] / 256


def _policy(algorithm: str = "linucb", seed: int = 0, **settings: Any) -> BanditPolicy:
    return BanditPolicy(
        PolicySettings(**settings), algorithm, model=None, rng=np.random.default_rng(seed)
    )


def _select(policy: BanditPolicy, req: ChatRequest, tp: TenantPolicy = TP) -> Decision:
    return policy.select(DecisionContext(req, CATALOG, tp))


def _feedback(req: ChatRequest, d: Decision, score: float, tp: TenantPolicy = TP) -> Reward:
    """The Reward the core builds: the decision record's features, with the tenant policy."""
    return Reward(
        req.request_id, req.tenant, d.tier, score, {**d.features, "tenant_policy": tp.summary()}
    )


def _interact(
    policy: BanditPolicy, rounds: int, seed: int, tenant: str = "acme", tp: TenantPolicy = TP
) -> list[tuple[str, Decision, Reward]]:
    rng = np.random.default_rng(seed)
    log = []
    for i in range(rounds):
        kind = "read" if rng.random() < 0.5 else "colour"
        req = _request(kind, f"{tenant}-{seed}-{i}", tenant)
        d = _select(policy, req, tp)
        score = float(rng.random() < KINDS[kind][2][TIERS.index(d.tier)])
        reward = _feedback(req, d, score, tp)
        policy.update(reward)
        log.append((kind, d, reward))
    return log


def test_both_policies_are_registered() -> None:
    for name in ("linucb", "lints"):
        policy = make_policy(PolicySettings(name=name))
        assert isinstance(policy, BanditPolicy) and policy.name == name


@pytest.mark.parametrize("algorithm", ["linucb", "lints"])
def test_learns_the_cheapest_sufficient_tier_per_request_kind(algorithm: str) -> None:
    policy = _policy(algorithm)
    log = _interact(policy, 400, seed=1)

    def good(kind: str, d: Decision) -> bool:
        return _value(kind, d.tier) >= max(_value(kind, t) for t in TIERS) - 0.05

    early = np.mean([good(k, d) for k, d, _ in log[:60]])
    late = np.mean([good(k, d) for k, d, _ in log[-100:]])
    assert late > 0.9 and late > early
    assert policy.bandit("acme").updates == 400  # type: ignore[union-attr]


def test_decision_records_what_learning_and_replay_need() -> None:
    policy = _policy("lints")
    d = _select(policy, _request("read", "r1"))
    f = d.features
    json.dumps(f)  # the decision record stores it as JSON
    assert len(f["context"]) == CONTEXT_DIM and f["context"][-1] == 1.0
    assert len(f["vector"]) == len(FEATURE_NAMES)
    for key in ("summary", "quality_weight", "quality_floor", "cheapest_meeting_floor"):
        assert key in f
    assert f["quality_weight"] == LAM and f["chosen_by"] in ("lints", "exploration")
    assert f["prior"] == dict.fromkeys(TIERS, NEUTRAL_P)
    assert d.predicted == {}  # no sufficiency model: no prediction to offer
    assert sum(f["action_probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert d.propensity == pytest.approx(f["action_probs"][d.tier], abs=1e-6)
    assert f["tier_costs"] == COSTS


@pytest.mark.parametrize("kind", ["read", "colour"])
def test_recorded_propensities_match_how_often_each_tier_is_chosen(kind: str) -> None:
    policy = _policy("lints", seed=10)
    explore = TenantPolicy(source="test", quality_weight=LAM, exploration=("thompson", 0.2))
    _interact(policy, 60, seed=11, tp=explore)
    req = _request(kind, "same")
    counts = dict.fromkeys(TIERS, 0)
    n = 3000
    for _ in range(n):  # no updates in between: the same distribution every time
        d = _select(policy, req, explore)
        counts[d.tier] += 1
    probs = d.features["action_probs"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    for tier in TIERS:
        assert counts[tier] / n == pytest.approx(probs.get(tier, 0.0), abs=0.03)
    assert max(probs.values()) < 0.95  # the case is really stochastic


def test_pinned_requests_keep_their_tier_and_still_teach() -> None:
    policy = _policy()
    req = _request("read", "p1", model="t4")
    d = _select(policy, req)
    assert (d.tier, d.propensity, d.features["chosen_by"]) == ("t4", 1.0, "pinned")
    policy.update(_feedback(req, d, 0.0))
    assert policy.bandit("acme").arms["t4"].n == 1  # type: ignore[union-attr]


def test_one_tenants_feedback_never_moves_another_tenants_routing() -> None:
    policy = _policy("lints")
    _interact(policy, 30, seed=2, tenant="bob")
    bob_probe = _select(policy, _request("colour", "probe", "bob")).features
    before = policy.action_probabilities(bob_probe, tenant="bob")
    bob_state = json.dumps(policy.bandit("bob").to_dict())  # type: ignore[union-attr]
    for i in range(200):  # mallory says every cheap answer was wrong, loudly
        req = _request("colour", f"m{i}", "mallory")
        d = _select(policy, req)
        policy.update(_feedback(req, dataclass_tier(d, "t1"), 0.0))
    assert json.dumps(policy.bandit("bob").to_dict()) == bob_state  # type: ignore[union-attr]
    assert policy.action_probabilities(bob_probe, tenant="bob") == before
    mallory = policy.action_probabilities(
        {**bob_probe, "tenant_policy": TP.summary()}, tenant="mallory"
    )
    assert mallory["t1"] < before["t1"]  # mallory's own routing did move


def dataclass_tier(d: Decision, tier: str) -> Decision:
    from dataclasses import replace

    return replace(d, tier=tier)


def test_scores_are_clipped_and_non_finite_ones_refused() -> None:
    clipped, one = _policy(), _policy()
    req = _request("read", "c1")
    d = _select(clipped, req)
    clipped.update(_feedback(req, d, 1e9))
    one.update(_feedback(req, d, 1.0))
    assert json.dumps(clipped.bandit("acme").to_dict()) == json.dumps(one.bandit("acme").to_dict())  # type: ignore[union-attr]
    low, zero = _policy(), _policy()
    low.update(_feedback(req, d, -5.0))
    zero.update(_feedback(req, d, 0.0))
    assert json.dumps(low.bandit("acme").to_dict()) == json.dumps(zero.bandit("acme").to_dict())  # type: ignore[union-attr]
    state = json.dumps(one.bandit("acme").to_dict())  # type: ignore[union-attr]
    one.update(_feedback(req, d, math.nan))
    one.update(Reward("x", "acme", "t1", 1.0, {"images": 1}))  # a rules decision: no context
    assert one.skipped_updates == 2
    assert json.dumps(one.bandit("acme").to_dict()) == state  # type: ignore[union-attr]


def _planted_model(p: list[float]) -> SufficiencyModel:
    """A real logistic sufficiency model whose P(correct) per tier is ``p`` for every request."""
    logit = np.log(np.array(p) / (1 - np.array(p)))
    params = {"coef": np.zeros((len(TIERS), len(FEATURE_NAMES))), "intercept": logit}
    return SufficiencyModel(TIERS, "logreg", params, None, {"version": "planted"})


def test_starts_from_the_sufficiency_model_and_honours_the_floor() -> None:
    model = _planted_model([0.2, 0.5, 0.85, 0.95, 0.97])
    policy = BanditPolicy(PolicySettings(bandit_alpha=0.0), "linucb", model=model)
    req = _request("read", "f1")
    floor = TenantPolicy(source="test", quality_weight=1.0, quality_floor=0.8)
    d = _select(policy, req, floor)
    assert d.predicted["t16"] == pytest.approx(0.85) == d.features["prior"]["t16"]
    assert d.tier == "t16" and d.features["cheapest_meeting_floor"] == "t16"
    none_meet = TenantPolicy(source="test", quality_weight=0.5, quality_floor=0.99)
    d = _select(policy, req, none_meet)
    assert d.tier == "t256" and d.features["cheapest_meeting_floor"] is None
    assert "no tier meets" in d.reason
    cheap = _select(policy, req, TenantPolicy(source="test", quality_weight=50.0))
    assert cheap.tier == "t1"  # no floor, cost dominates


def test_allowed_tiers_and_exploration_shape_the_probabilities() -> None:
    policy = _policy("lints", bandit_epsilon=0.2)
    tp = TenantPolicy(source="test", quality_weight=LAM, allowed_tiers=("t4", "t16", "t64"))
    for i in range(30):
        d = _select(policy, _request("read", f"a{i}"), tp)
        assert d.tier in tp.allowed_tiers
        assert set(d.features["action_probs"]) <= set(tp.allowed_tiers)
        assert min(d.features["action_probs"].values()) >= 0.2 / 3 - 1e-6  # ε spread over 3
    off = TenantPolicy(source="test", quality_weight=LAM, exploration=("none", 0.0))
    probs = _select(policy, _request("read", "b"), off).features["action_probs"]
    pure = _select(_policy("lints"), _request("read", "b")).features["action_probs"]
    assert probs == pure  # the tenant turned the configured ε off
    greedy = _policy("linucb")
    explore = TenantPolicy(source="test", quality_weight=LAM, exploration=("linucb", 0.5))
    d = _select(greedy, _request("read", "c"), explore)
    assert sorted(d.features["action_probs"].values())[:4] == pytest.approx([0.1] * 4)


def test_tenants_over_the_cap_route_on_the_prior_without_learning() -> None:
    policy = _policy(bandit_max_tenants=1)
    _interact(policy, 3, seed=3, tenant="first")
    log = _interact(policy, 3, seed=3, tenant="second")
    assert policy.bandit("second") is None and policy.skipped_updates == 3
    assert log[-1][1].features["bandit"]["state"] == "prior"


def test_state_survives_a_new_policy_on_the_same_store(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'foveal.db'}")
    store.migrate()
    try:
        first = _policy("linucb", bandit_persist_every=10, bandit_persist_interval_s=86400)
        first.bind_store(store)
        _interact(first, 25, seed=4)
        first.drain()  # the writes due after 10 and 20 updates
        saved = store.get_learned_state("linucb:acme")
        assert saved is not None and saved["bandit"]["updates"] == 20
        first.close()  # writes the 5 updates not yet saved
        second = _policy("linucb")
        second.bind_store(store)
        probe = _select(first, _request("read", "probe")).features
        assert second.bandit("acme").updates == 25  # type: ignore[union-attr]
        assert second.action_probabilities(probe, tenant="acme") == first.action_probabilities(
            probe, tenant="acme"
        )
        second.close()
    finally:
        store.close()


def test_state_is_also_written_once_the_interval_has_passed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'foveal.db'}")
    store.migrate()
    try:
        policy = _policy("lints", bandit_persist_every=1000, bandit_persist_interval_s=1e-9)
        policy.bind_store(store)
        _interact(policy, 3, seed=12)
        policy.drain()  # no flush: what was written, was written because it was due
        saved = store.get_learned_state("lints:acme")
        assert saved is not None and saved["bandit"]["updates"] >= 2
        policy.close()
    finally:
        store.close()


def test_state_from_another_model_or_features_version_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'foveal.db'}")
    store.migrate()
    try:
        policy = _policy()
        _interact(policy, 5, seed=5)
        good = policy.state_payload("acme", policy.bandit("acme"))  # type: ignore[arg-type]
        store.put_learned_state("linucb:acme", "acme", "linucb", good)
        store.put_learned_state(
            "linucb:old", "old", "linucb", {**good, "tenant": "old", "model_version": "m0"}
        )
        small = _policy()
        payload = small.state_payload("x", small._new_bandit())
        payload["bandit"]["dim"] = CONTEXT_DIM - 1
        store.put_learned_state("linucb:x", "x", "linucb", payload)
        fresh = _policy()
        with caplog.at_level(logging.WARNING):
            assert fresh.load_state(store) == 1
        assert fresh.bandit("acme") is not None and fresh.bandit("old") is None
        assert "model_version 'm0'" in caplog.text
        assert f"dimension {CONTEXT_DIM - 1} but the contexts now have {CONTEXT_DIM}" in caplog.text
    finally:
        store.close()


def test_off_policy_estimates_of_a_trained_candidate_cover_its_true_value() -> None:
    explore = TenantPolicy(source="test", quality_weight=LAM, exploration=("thompson", 0.2))
    logger = _policy("lints", seed=6)
    log = _interact(logger, 600, seed=7, tp=explore)
    candidate = _policy("linucb", seed=8)
    _interact(candidate, 300, seed=9, tp=explore)  # trained on its own traffic
    rows = []
    true_acc = true_cost = 0.0
    for kind, d, reward in log:
        probs = candidate.action_probabilities(reward.features, tenant="acme")
        true_acc += sum(p * KINDS[kind][2][TIERS.index(t)] for t, p in probs.items())
        true_cost += sum(p * COSTS[t] for t, p in probs.items())
        record = DecisionRecord(
            request_id=reward.request_id,
            tenant="acme",
            tier=d.tier,
            chosen_tier=d.tier,
            requested_model="auto",
            policy=d.policy,
            reason=d.reason,
            propensity=d.propensity,
            features=reward.features,
            predicted=d.predicted,
            cost=COSTS[d.tier],
        )
        rows.append((record, FeedbackRecord(reward.request_id, "acme", reward.score)))
    true_acc, true_cost = true_acc / len(log), true_cost / len(log)
    result = evaluate(candidate, rows, z=3.0)  # heavy-tailed weights: a wide interval
    assert result.n_logged == 600 and not result.skipped
    assert result.support == pytest.approx(1.0)  # the logger explored every tier
    for e in result.estimates:
        if e.estimator == "logged":
            continue
        assert e.accuracy.low <= true_acc <= e.accuracy.high, (e.estimator, e.accuracy, true_acc)
        assert e.cost.low <= true_cost <= e.cost.high, (e.estimator, e.cost, true_cost)
