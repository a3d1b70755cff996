"""The sufficiency model: choosing a tier, learning and calibration, artifacts, the data it
trains on (outcome files and the store) and train/serve parity of its features."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from foveal.bench.outcomes import run_outcomes, samples_for
from foveal.bench.suite import generate_suite
from foveal.bench.suite.dataset import encode_png
from foveal.cli import app
from foveal.config import Settings
from foveal.pools.catalog import Catalog, CatalogHolder
from foveal.router import sufficiency as S
from foveal.router.features import FEATURE_NAMES, FEATURES_VERSION, FeatureExtractor
from foveal.router.parsing import RequestBuilder
from foveal.router.requests import RawImage
from foveal.router.sufficiency import (
    ArtifactError,
    SufficiencyModel,
    TrainingSet,
    choose_tier,
    read_outcomes,
    request_from_outcome,
    train_model,
    training_set_from_outcomes,
    training_set_from_store,
)
from foveal.store import Store
from foveal.store.records import DecisionRecord, FeedbackRecord

TIERS = ["t1", "t4", "t16", "t64", "t256"]
COST = {"t1": 1.0, "t4": 4.0, "t16": 16.0, "t64": 64.0, "t256": 256.0}
TL = FEATURE_NAMES.index("text_likeness")


# -- choose_tier ----------------------------------------------------------------------------


def test_quality_only_picks_the_most_likely_tier() -> None:
    p = {"t1": 0.2, "t4": 0.5, "t16": 0.8, "t64": 0.9, "t256": 0.85}
    assert choose_tier(p, COST, 0.0, 0.0, TIERS) == ("t64", "t1")


def test_lambda_trades_quality_for_cost() -> None:
    p = {"t1": 0.70, "t4": 0.72, "t16": 0.80, "t64": 0.90, "t256": 0.95}
    assert choose_tier(p, COST, 0.0, 0.0, TIERS)[0] == "t256"
    # λ=0.1: t256 scores 0.85, t64 0.875, t16 0.794 -> t64
    assert choose_tier(p, COST, 0.1, 0.0, TIERS)[0] == "t64"
    assert choose_tier(p, COST, 1.0, 0.0, TIERS)[0] == "t16"  # 0.80 - 0.0625 > 0.72 - 0.016
    assert choose_tier(p, COST, 10.0, 0.0, TIERS)[0] == "t1"


def test_floor_excludes_tiers_and_names_the_cheapest_meeting_it() -> None:
    p = {"t1": 0.70, "t4": 0.72, "t16": 0.80, "t64": 0.90, "t256": 0.95}
    assert choose_tier(p, COST, 10.0, 0.75, TIERS) == ("t16", "t16")
    assert choose_tier(p, COST, 10.0, 0.9, TIERS) == ("t64", "t64")
    assert choose_tier(p, COST, 0.0, 0.9, TIERS) == ("t256", "t64")


def test_no_tier_meeting_the_floor_goes_to_the_most_likely() -> None:
    p = {"t1": 0.1, "t4": 0.3, "t16": 0.2, "t64": 0.25, "t256": 0.2}
    assert choose_tier(p, COST, 10.0, 0.5, TIERS) == ("t4", None)


def test_allowed_tiers_bound_the_choice() -> None:
    p = {"t1": 0.5, "t4": 0.6, "t16": 0.8, "t64": 0.9, "t256": 0.95}
    assert choose_tier(p, COST, 0.0, 0.0, ["t1", "t16"]) == ("t16", "t1")
    assert choose_tier(p, COST, 0.0, 0.7, ["t1", "t4"]) == ("t4", None)
    with pytest.raises(ValueError, match="no allowed tier"):
        choose_tier(p, COST, 0.0, 0.0, ["t9"])


def test_ties_go_to_the_cheaper_tier() -> None:
    p = dict.fromkeys(TIERS, 0.9)
    assert choose_tier(p, COST, 0.0, 0.0, TIERS)[0] == "t1"


def test_cost_is_normalised_by_the_most_expensive_tier() -> None:
    p = {"a": 0.5, "b": 0.9}
    # b costs 1.0 normalised: 0.9 - 0.5 = 0.4 < 0.5 - 0.5 * 0.1 = 0.45
    assert choose_tier(p, {"a": 10.0, "b": 100.0}, 0.5, 0.0, ["a", "b"])[0] == "a"
    assert choose_tier(p, {"a": 1000.0, "b": 10000.0}, 0.5, 0.0, ["a", "b"])[0] == "a"
    assert choose_tier(p, {"a": 10.0, "b": 100.0}, 0.3, 0.0, ["a", "b"])[0] == "b"


# -- learning a planted rule ----------------------------------------------------------------


def planted(n: int, seed: int, noise: float = 0.05) -> TrainingSet:
    """Each sample needs tier index `need` (seen through the text-likeness feature): it is
    answered right at that tier and above, with `noise` of the labels flipped."""
    rng = np.random.default_rng(seed)
    need = rng.integers(0, len(TIERS), n)
    X = np.zeros((n, len(FEATURE_NAMES)))
    X[:, :12] = rng.random((n, 12)) * 0.1  # distractors (the other features stay constant)
    X[:, TL] = need / 4 + rng.normal(0, 0.03, n)
    rows = np.repeat(np.arange(n), len(TIERS))
    tiers = np.tile(np.array(TIERS), n)
    level = np.tile(np.arange(len(TIERS)), n)
    y = (level >= need[rows]).astype(int)
    flip = rng.random(len(y)) < noise
    y[flip] = 1 - y[flip]
    groups = np.array([f"s{i}" for i in rows])
    return TrainingSet(X[rows], tiers, y, groups, np.full(len(y), ""), "planted")


@pytest.mark.parametrize("kind", ["hgb", "logreg"])
def test_model_learns_a_planted_rule_calibrated(kind: str) -> None:
    model = train_model(planted(600, 0), kind=kind, holdout=0.2)
    assert model.tiers == tuple(TIERS)
    held = model.metadata["metrics"]["holdout"]
    assert held["auc"] > 0.9 and held["ece"] < 0.08
    fresh = planted(400, 1)
    p = S._row_predictions(model, fresh, np.arange(len(fresh)))
    m = S.calibration_metrics(p, fresh.y)
    assert m["auc"] > 0.9 and m["ece"] < 0.08 and m["brier"] < 0.08
    # the rule itself: a sample needing t64 is predicted to fail below it and pass from it on
    x = np.full(len(FEATURE_NAMES), 0.05)
    x[TL] = 3 / 4
    row = model.predict_many(x)[0]
    assert row[0] < 0.2 and row[1] < 0.2 and row[3] > 0.8 and row[4] > 0.8


def test_a_model_sees_only_its_feature_groups(tmp_path: Path) -> None:
    ts = planted(400, 4)  # the rule lives in an image feature
    image_only = train_model(ts, kind="logreg", feature_groups=["image"], version="img")
    text_only = train_model(ts, kind="logreg", feature_groups=["text"], version="txt")
    auc_image = image_only.metadata["metrics"]["holdout"]["auc"]
    auc_text = text_only.metadata["metrics"]["holdout"]["auc"]  # only the tiers' base rates
    assert auc_image > 0.9 and auc_text < auc_image - 0.08
    assert image_only.metadata["feature_groups"] == ["image"]
    loaded = SufficiencyModel.load(image_only.save(tmp_path / "img.npz"))
    x = ts.X[:3].copy()
    text_cols = np.isin(FEATURE_NAMES, S.FEATURE_GROUPS["text"])
    y = x.copy()
    y[:, text_cols] = 1.0  # another prompt: an image-only model does not care
    assert np.array_equal(loaded.predict_many(x), loaded.predict_many(y))
    with pytest.raises(ValueError, match="feature groups"):
        train_model(ts, feature_groups=["pixels"])


def test_compiled_trees_match_scikit_learn() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(3)
    X = rng.random((800, 12))
    y = (X[:, 0] + 0.5 * X[:, 3] + rng.normal(0, 0.2, 800) > 0.8).astype(int)
    est = HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(X, y)
    Xt = rng.random((200, 12))
    assert np.allclose(S.trees_raw(S.compile_trees(est), Xt), est.decision_function(Xt))


def test_all_same_outcome_cannot_be_learnt() -> None:
    ts = planted(50, 0, noise=0.0)
    ts.y[:] = 1
    with pytest.raises(ValueError, match="all correct or all wrong"):
        train_model(ts)


# -- artifacts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model() -> SufficiencyModel:
    return train_model(planted(300, 2), kind="hgb", holdout=0.2, version="test-1")


def test_artifact_round_trip(small_model: SufficiencyModel, tmp_path: Path) -> None:
    path = small_model.save(tmp_path / "m.npz")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["version"] == "test-1" and meta["features_version"] == FEATURES_VERSION
    assert meta["tiers"] == TIERS and meta["training_rows"] == 1500 and meta["format"] == 1
    assert {"created", "metrics", "kind"} <= set(meta) and "auc" in meta["metrics"]["holdout"]
    loaded = SufficiencyModel.load(path)
    X = planted(40, 9).X
    assert np.array_equal(loaded.predict_many(X), small_model.predict_many(X))
    assert loaded.version == "test-1" and loaded.tiers == tuple(TIERS)


def test_artifact_of_other_features_version_is_refused(
    small_model: SufficiencyModel, tmp_path: Path
) -> None:
    path = small_model.save(tmp_path / "m.npz")
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, "features_version": "f0"}))
    with pytest.raises(ArtifactError, match=r"features version 'f0'.*foveal router train"):
        SufficiencyModel.load(path)
    (tmp_path / "m.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ArtifactError, match="artifact format 99"):
        SufficiencyModel.load(path)


def test_artifact_problems_are_named(small_model: SufficiencyModel, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no sufficiency model at"):
        SufficiencyModel.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="an .npz file"):
        small_model.save(tmp_path / "m.joblib")
    path = small_model.save(tmp_path / "m.npz")
    other = train_model(planted(100, 5), kind="logreg", holdout=0, version="test-2")
    other.save(tmp_path / "o.npz")
    (tmp_path / "m.json").write_text((tmp_path / "o.json").read_text())
    with pytest.raises(ArtifactError, match="different models"):
        SufficiencyModel.load(path)
    path.write_bytes(b"garbage")
    (tmp_path / "m.json").write_text(json.dumps({**json.loads((tmp_path / "o.json").read_text())}))
    with pytest.raises(ArtifactError, match="unreadable model artifact"):
        SufficiencyModel.load(path)


def test_shipped_model_loads_and_knows_reading_is_hard() -> None:
    model = SufficiencyModel.default()
    assert model.tiers == tuple(TIERS) and model.features_version == FEATURES_VERSION
    assert model.metadata["metrics"]["holdout"]["auc"] > 0.8
    fx = FeatureExtractor()
    by_family: dict[str, list[dict[str, float]]] = {}
    for s in generate_suite(7 * 10, seed=SPLIT_TEST_SEED):
        o = S.Outcome(s.id, "t1", True, s.question, s.family, encode_png(s.image))
        by_family.setdefault(s.family, []).append(
            model.predict(fx.extract(request_from_outcome(o)))
        )
    mean = {f: {t: np.mean([p[t] for p in ps]) for t in TIERS} for f, ps in by_family.items()}
    assert all(0.0 <= v <= 1.0 for ps in by_family.values() for p in ps for v in p.values())
    assert mean["colour"]["t1"] > 0.8  # colour survives one visual token
    assert mean["ocr"]["t1"] < 0.1 and mean["document"]["t4"] < 0.1
    assert mean["ocr"]["t256"] > mean["ocr"]["t1"]


SPLIT_TEST_SEED = 2_000_000  # the suite's test split: never trained on


# -- outcome files, the store, parity -------------------------------------------------------


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_outcomes_file_and_train_serve_parity(tmp_path: Path) -> None:
    samples = list(samples_for("train", 1))[:3]
    summary = run_outcomes(tmp_path / "o.jsonl", samples, tiers=["t1", "t4"])
    assert summary["rows"] == 6 and set(summary["tiers"]) == {"t1", "t4"}
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    keys = {"id", "family", "question", "answer", "prediction", "correct", "tier", "image"}
    assert all(keys | {"params", "visual_tokens", "checkpoint"} <= set(r) for r in lines)
    assert all(r["image"] == f"images/{r['id']}.png" for r in lines)
    assert all("difficulty" in r["params"] for r in lines)
    embedded = run_outcomes(tmp_path / "e.jsonl", samples[:1], tiers=["t1"], embed=True)
    assert embedded["rows"] == 1
    assert json.loads((tmp_path / "e.jsonl").read_text())["image"].startswith("data:image/png")

    outcomes = read_outcomes(tmp_path / "o.jsonl")
    ts = training_set_from_outcomes(outcomes)
    assert ts.X.shape == (6, len(FEATURE_NAMES))
    assert sorted(zip(ts.groups, ts.tiers, strict=True)) == sorted(
        (s.id, t) for s in samples for t in ("t1", "t4")
    )
    vectors = {g: ts.X[i] for i, g in enumerate(ts.groups)}
    # the request a client sends with the same bytes, parsed by the edge's RequestBuilder
    settings = Settings()
    builder = RequestBuilder(settings, CatalogHolder(Catalog.from_settings(settings.tiers)), None)
    for s in samples:
        uri = "data:image/png;base64," + base64.b64encode(s.image).decode()
        req = asyncio.run(
            builder.build(
                tenant="acme",
                tenant_cap=None,
                model="auto",
                messages=[("user", [RawImage(url=uri), s.question])],
                max_tokens=None,
                stream=False,
                edge="http",
            )
        )
        assert np.array_equal(FeatureExtractor().extract(req).vector, vectors[s.id])


def test_bad_outcome_rows_are_named(tmp_path: Path) -> None:
    png = "data:image/png;base64," + base64.b64encode(encode_png(_image())).decode()
    good = {"id": "a", "tier": "t1", "question": "q?", "image": png, "correct": True}
    _write_rows(tmp_path / "ok.jsonl", [good])
    assert read_outcomes(tmp_path / "ok.jsonl")[0].correct is True
    cases = [
        ({**good, "correct": "yes"}, "field 'correct' must be true or false"),
        ({k: v for k, v in good.items() if k != "tier"}, "field 'tier'"),
        ({**good, "image": "../x.png"}, "must be relative"),
        ({**good, "image": "images/none.png"}, "No such file"),
        ({**good, "image": "data:image/png;base64,@@@"}, "not valid base64"),
    ]
    for row, message in cases:
        path = _write_rows(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
            read_outcomes(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no outcome rows"):
        read_outcomes(tmp_path / "empty.jsonl")


def _image() -> Any:
    return next(iter(generate_suite(1, seed=1))).image


def test_training_set_from_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = Store(url)
    store.migrate()
    vec = list(np.round(np.linspace(0, 1, len(FEATURE_NAMES)), 4))
    summary = {"version": FEATURES_VERSION}

    def decision(i: int, tier: str, features: dict[str, Any]) -> DecisionRecord:
        return DecisionRecord(
            request_id=f"r{i}",
            tenant="acme",
            tier=tier,
            chosen_tier=tier,
            requested_model="auto",
            policy="model",
            reason="x",
            propensity=1.0,
            features=features,
        )

    try:
        store.add_decisions(
            [
                decision(1, "t4", {"summary": summary, "vector": vec}),
                decision(2, "t64", {"summary": summary, "vector": vec}),
                decision(3, "t1", {"summary": {"version": "f0"}, "vector": vec}),  # stale
                decision(4, "t1", {"images": 1}),  # the rule policy: no vector
                decision(5, "t16", {"summary": summary, "vector": vec}),  # no feedback
            ]
        )
        for i, score in ((1, 0.9), (2, 0.2), (3, 1.0), (4, 1.0)):
            store.add_feedback(FeedbackRecord(f"r{i}", "acme", score))
        ts = training_set_from_store(url)
        assert sorted(zip(ts.groups, ts.tiers, ts.y, strict=True)) == [
            ("r1", "t4", 1),
            ("r2", "t64", 0),
        ]
        assert np.allclose(ts.X[0], vec)
    finally:
        store.close()
    empty = Store(f"sqlite:///{tmp_path / 'e.db'}")
    empty.migrate()
    empty.close()
    with pytest.raises(ValueError, match="no decisions with feedback"):
        training_set_from_store(f"sqlite:///{tmp_path / 'e.db'}")


# -- the commands ---------------------------------------------------------------------------


def _synthetic_outcomes(tmp_path: Path) -> Path:
    """Reading samples answered only at t256, colour samples at every tier."""
    rows = []
    for s in generate_suite(7 * 30, seed=7):
        if s.family not in ("ocr", "colour"):
            continue
        uri = "data:image/png;base64," + base64.b64encode(encode_png(s.image)).decode()
        for t in TIERS:
            ok = s.family == "colour" or t == "t256"
            rows.append(
                {
                    "id": s.id,
                    "tier": t,
                    "question": s.question,
                    "image": uri,
                    "correct": ok,
                    "family": s.family,
                }
            )
    return _write_rows(tmp_path / "synthetic.jsonl", rows)


def test_router_train_command(tmp_path: Path) -> None:
    outcomes = _synthetic_outcomes(tmp_path)
    out = tmp_path / "art" / "model.npz"
    res = CliRunner().invoke(
        app, ["router", "train", "--outcomes", str(outcomes), "--out", str(out), "--version", "v7"]
    )
    assert res.exit_code == 0, res.output
    assert "held-out: AUC" in res.output
    model = SufficiencyModel.load(out)
    assert model.version == "v7" and model.metadata["training_rows"] == 300
    fx = FeatureExtractor()
    ocr = [o for o in read_outcomes(outcomes) if o.family == "ocr"][0]
    colour = [o for o in read_outcomes(outcomes) if o.family == "colour"][0]
    p_ocr = model.predict(fx.extract(request_from_outcome(ocr)))
    p_col = model.predict(fx.extract(request_from_outcome(colour)))
    assert p_ocr["t256"] > 0.8 and p_ocr["t1"] < 0.2 and p_col["t1"] > 0.8


def test_router_train_command_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["router", "train", "--out", str(tmp_path / "m.npz")])
    assert res.exit_code != 0 and "--outcomes" in res.output
    bad = _write_rows(tmp_path / "bad.jsonl", [{"id": "a"}])
    res = runner.invoke(
        app, ["router", "train", "--outcomes", str(bad), "--out", str(tmp_path / "m.npz")]
    )
    assert res.exit_code != 0 and "bad.jsonl:1" in res.output


def test_bench_outcomes_command(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(
        app,
        ["bench", "outcomes", "--per-family", "1", "--tiers", "t1,t16", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 14 and {r["tier"] for r in rows} == {"t1", "t16"}
    assert {r["split"] for r in rows} == {"train"}
    res = CliRunner().invoke(
        app, ["bench", "outcomes", "--per-family", "1", "--tiers", "t3", "--out", str(out)]
    )
    assert res.exit_code != 0 and "t3" in res.output
