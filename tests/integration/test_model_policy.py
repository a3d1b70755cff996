"""The `model` policy: the sufficiency model and the tenant's λ / floor / allowed tiers choose the
tier — end to end through the real router (gateway, store, fake pools on loopback), and
select() on its own for the cases a stack cannot set up cheaply."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from foveal.bench.suite import generate_suite
from foveal.bench.suite.dataset import encode_png
from foveal.config import PolicySettings, TierSettings
from foveal.pools.catalog import Catalog
from foveal.router.features import CONTEXT_DIM, FEATURE_NAMES, FeatureExtractor
from foveal.router.model_policy import ModelPolicy
from foveal.router.policies import DecisionContext
from foveal.router.requests import ChatRequest
from foveal.router.sufficiency import (
    ArtifactError,
    Outcome,
    SufficiencyModel,
    request_from_outcome,
    train_model,
    training_set_from_outcomes,
)
from foveal.router.tenant_policy import TenantPolicy
from foveal.testing.stack import LocalStack, running_stack

TIERS = ["t1", "t4", "t16", "t64", "t256"]


def _samples(family: str, n: int = 1, seed: int = 2_000_000) -> list[Any]:
    return [s for s in generate_suite(7 * 8, seed=seed) if s.family == family][:n]


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _body(question: str, png: bytes | None, model: str = "auto") -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if png is not None:
        content.append({"type": "image_url", "image_url": {"url": _uri(png)}})
    return {"model": model, "messages": [{"role": "user", "content": content}]}


async def _ask(stack: LocalStack, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(answering tier, the decision record as Explain returns it)."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{stack.http_url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            tier, rid = r.headers["x-foveal-tier"], r.headers["x-foveal-request-id"]
        await stack.core.writer.flush()
        async with s.get(f"{stack.http_url}/v1/decisions/{rid}") as r:
            assert r.status == 200, await r.text()
            record: dict[str, Any] = await r.json()
    return tier, record


@pytest.fixture(scope="module")
def planted_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on planted outcomes: reading images are answered only at t256, colour
    images at every tier (real images, real features)."""
    rows = []
    for s in generate_suite(7 * 30, seed=7):
        if s.family in ("ocr", "colour"):
            png = encode_png(s.image)
            for t in TIERS:
                ok = s.family == "colour" or t == "t256"
                rows.append(Outcome(s.id, t, ok, s.question, s.family, png))
    model = train_model(training_set_from_outcomes(rows), kind="hgb", version="planted-1")
    return model.save(tmp_path_factory.mktemp("model") / "planted.npz")


# -- end to end -----------------------------------------------------------------------------


@pytest.fixture
async def shipped_stack() -> AsyncIterator[LocalStack]:
    async with running_stack(
        policy={"name": "model"}, tenant_policy={"quality_weight": 0.5, "quality_floor": 0.5}
    ) as s:
        yield s


async def test_shipped_model_routes_colour_cheaply_and_records_its_features(
    shipped_stack: LocalStack,
) -> None:
    s = _samples("colour")[0]
    png = encode_png(s.image)
    tier, record = await _ask(shipped_stack, _body(s.question, png))
    assert tier == "t1" and record["policy"] == "model"
    f, predicted = record["features"], record["predicted"]
    assert set(predicted) == set(TIERS) and predicted["t1"] >= 0.5
    assert f["chosen_by"] == "model" and f["cheapest_meeting_floor"] == "t1"
    assert f["quality_weight"] == 0.5 and f["quality_floor"] == 0.5
    assert len(f["context"]) == CONTEXT_DIM and f["context"][-1] == 1.0
    assert f["summary"]["image"]["width"] == 128 and f["model_version"]
    # train/serve parity: the vector the router recorded is the one training computes from the
    # same image bytes and question (up to the record's 4 decimals)
    training = training_set_from_outcomes([Outcome(s.id, "t1", True, s.question, "", png)])
    assert len(f["vector"]) == len(FEATURE_NAMES)
    assert np.allclose(f["vector"], training.X[0], atol=5e-5)
    model = SufficiencyModel.default()
    assert model.predict_many(np.array(f["vector"]))[0] == pytest.approx(
        [predicted[t] for t in TIERS], abs=2e-3
    )


async def test_no_tier_meeting_the_floor_goes_to_the_most_likely(
    shipped_stack: LocalStack,
) -> None:
    s = _samples("document")[0]
    tier, record = await _ask(shipped_stack, _body(s.question, encode_png(s.image)))
    predicted = record["predicted"]
    assert max(predicted.values()) < 0.5  # documents are rarely read right at any tier
    assert tier == max(TIERS, key=lambda t: (predicted[t], -TIERS.index(t)))
    assert record["features"]["chosen_by"] == "floor-unmet"
    assert record["features"]["cheapest_meeting_floor"] is None
    assert "floor" in record["reason"]


async def test_pins_are_kept_and_text_only_goes_lowest(shipped_stack: LocalStack) -> None:
    s = _samples("colour")[0]
    tier, record = await _ask(shipped_stack, _body(s.question, encode_png(s.image), "t64"))
    assert tier == "t64" and record["features"]["chosen_by"] == "pin"
    assert set(record["predicted"]) == set(TIERS)  # still recorded: pinned traffic trains too
    tier, record = await _ask(shipped_stack, _body("Tell me a joke.", None))
    assert tier == "t1" and record["features"]["chosen_by"] == "no-image"
    assert record["predicted"] == {}


async def test_configured_artifact_and_tenant_policy_decide(planted_artifact: Path) -> None:
    ocr, colour = _samples("ocr")[0], _samples("colour")[0]
    async with running_stack(
        policy={"name": "model", "model_path": str(planted_artifact)},
        tenant_policy={"quality_weight": 0.2, "quality_floor": 0.6},
    ) as stack:
        tier, record = await _ask(stack, _body(ocr.question, encode_png(ocr.image)))
        assert tier == "t256" and record["features"]["model_version"] == "planted-1"
        assert record["features"]["cheapest_meeting_floor"] == "t256"
        tier, _ = await _ask(stack, _body(colour.question, encode_png(colour.image)))
        assert tier == "t1"
    async with running_stack(
        policy={"name": "model", "model_path": str(planted_artifact)},
        tenant_policy={"allowed_tiers": ["t4", "t16", "t64"], "quality_floor": 0.6},
    ) as stack:
        tier, record = await _ask(stack, _body(ocr.question, encode_png(ocr.image)))
        assert tier in ("t4", "t16", "t64") and record["features"]["chosen_by"] == "floor-unmet"


async def test_a_missing_artifact_stops_the_router_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no sufficiency model at .*foveal router train"):
        async with running_stack(
            policy={"name": "model", "model_path": str(tmp_path / "none.npz")}
        ):
            pass


# -- select() on its own --------------------------------------------------------------------


def _catalog(names: list[str], costs: list[float] | None = None) -> Catalog:
    costs = costs or [float(4**i) for i in range(len(names))]
    return Catalog.from_settings(
        TierSettings(name=n, visual_tokens=int(c), cost_weight=c)
        for n, c in zip(names, costs, strict=True)
    )


def _request(sample: Any, model: str = "auto") -> ChatRequest:
    o = Outcome(sample.id, "t1", True, sample.question, sample.family, encode_png(sample.image))
    req = request_from_outcome(o)
    return ChatRequest(req.request_id, "acme", model, req.messages, 16)


@pytest.fixture(scope="module")
def planted(planted_artifact: Path) -> ModelPolicy:
    return ModelPolicy(
        PolicySettings(name="model"), model=SufficiencyModel.load(planted_artifact), seed=1
    )


def test_lambda_moves_the_choice(planted: ModelPolicy) -> None:
    req = _request(_samples("colour")[0])
    cat = _catalog(TIERS)
    quality = planted.select(DecisionContext(req, cat, TenantPolicy("t", quality_weight=0.0)))
    cheap = planted.select(DecisionContext(req, cat, TenantPolicy("t", quality_weight=0.5)))
    assert cheap.tier == "t1" and cheap.propensity == 1.0
    p = quality.predicted
    assert quality.tier == max(TIERS, key=lambda t: (p[t], -TIERS.index(t)))


def test_tiers_the_model_does_not_know(planted: ModelPolicy) -> None:
    req = _request(_samples("ocr")[0])
    mixed = planted.select(DecisionContext(req, _catalog(["t1", "t256", "t1024"]), None))
    assert mixed.tier == "t256" and "t1024" not in mixed.predicted
    assert mixed.features["unpredicted_tiers"] == ["t1024"]
    foreign = planted.select(DecisionContext(req, _catalog(["small", "large"]), None))
    assert foreign.features["chosen_by"] == "rules" and foreign.predicted == {}
    assert "knows none of the allowed tiers small, large" in foreign.reason


def test_exploration_draws_tiers_with_their_propensity(planted: ModelPolicy) -> None:
    req = _request(_samples("ocr")[0])
    tp = TenantPolicy("t", exploration=("linucb", 1.0))
    seen = set()
    for _ in range(40):
        d = planted.select(DecisionContext(req, _catalog(TIERS), tp))
        assert d.features["chosen_by"] == "explore" and d.propensity == pytest.approx(1 / 5)
        seen.add(d.tier)
    assert seen == set(TIERS)
    tp = TenantPolicy("t", exploration=("linucb", 0.2))
    greedy = [
        d
        for d in (planted.select(DecisionContext(req, _catalog(TIERS), tp)) for _ in range(60))
        if d.features["chosen_by"] == "model"
    ]
    assert greedy and all(d.propensity == pytest.approx(0.8 + 0.2 / 5) for d in greedy)
    off = TenantPolicy("t", exploration=("none", 1.0))
    assert planted.select(DecisionContext(req, _catalog(TIERS), off)).propensity == 1.0


def test_previous_tier_reaches_the_features(planted: ModelPolicy) -> None:
    req = _request(_samples("colour")[0])
    d = planted.select(DecisionContext(req, _catalog(TIERS), None, previous_tier="t64"))
    assert d.features["summary"]["previous_tier"] == "t64"
    assert d.features["vector"][FEATURE_NAMES.index("has_previous_tier")] == 1.0


def test_recorded_vector_matches_the_extractor(planted: ModelPolicy) -> None:
    req = _request(_samples("chart")[0])
    d = planted.select(DecisionContext(req, _catalog(TIERS), None))
    direct = FeatureExtractor().extract(req)
    assert np.allclose(d.features["vector"], direct.vector, atol=5e-5)
    assert np.allclose(d.features["context"], direct.context, atol=5e-5)
