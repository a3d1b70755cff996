"""The sufficiency model: calibrated P(correct | request features, tier) for every tier.

Trained from logged outcomes (a ``foveal bench outcomes`` file, or the store's decisions joined
with their feedback) by ``foveal router train``; the learned policies read it on the hot path.

Training features are computed from the outcome rows on the request path's own code: each row
becomes a :class:`ChatRequest` through the edge's image validation (:func:`image_from_bytes`,
which keeps the preview the features read) and goes through the same :class:`FeatureExtractor`.
Store rows carry the feature vector the router recorded at decision time.

Two model kinds, chosen by measurement (docs/routing.md):

- ``hgb``: one gradient-boosted tree model over [features, one-hot tier] (tiers share what they
  have in common), then one isotonic calibration map per tier fitted on out-of-fold predictions;
- ``logreg``: one L2 logistic regression per tier, same calibration.

Both are kept as plain arrays (the trees flattened into node tables, walked level by level for
all trees at once: ~0.2 ms for the five tiers of a request, where scikit-learn's own predict costs
~1.5 ms of call overhead). An artifact is an ``.npz`` of those arrays plus a JSON sidecar
(``<name>.json``) with the format, the features version, the tiers, the training rows and the
held-out metrics. It is loaded without pickle (no code runs on load) and without scikit-learn,
which only training needs. Loading refuses an artifact whose format or features version differs
from this router's: the features would not mean what the model learnt.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from foveal.config import LimitsSettings
from foveal.router.features import (
    FEATURE_GROUPS,
    FEATURE_NAMES,
    FEATURES_VERSION,
    FeatureExtractor,
    RequestFeatures,
)
from foveal.router.images import image_from_bytes
from foveal.router.requests import ChatRequest, image_question

__all__ = [
    "ARTIFACT_FORMAT",
    "DEFAULT_ARTIFACT",
    "ArtifactError",
    "Outcome",
    "SufficiencyModel",
    "TrainingSet",
    "calibration_metrics",
    "choose_tier",
    "compile_trees",
    "read_outcomes",
    "request_from_outcome",
    "training_set_from_outcomes",
    "training_set_from_store",
    "train_model",
    "trees_raw",
]

ARTIFACT_FORMAT = 1
DEFAULT_ARTIFACT = Path(__file__).parent / "artifacts" / "sufficiency.npz"
_DATA_URI = re.compile(r"data:image/[a-z]+;base64,(.*)", re.DOTALL)
_LIMITS = LimitsSettings()


class ArtifactError(ValueError):
    """A model artifact that cannot be used: missing, unreadable, or for other features."""


# -- choosing a tier ------------------------------------------------------------------------


def choose_tier(
    p: dict[str, float],
    cost: dict[str, float],
    lam: float,
    floor: float,
    allowed: Sequence[str],
) -> tuple[str, str | None]:
    """(chosen tier, cheapest tier meeting the floor) among ``allowed`` tiers with a prediction.

    Maximises P(correct) - λ·cost/max(cost) over the allowed tiers whose P meets ``floor``; if
    none does, the tier with the highest P (quality first). Ties go to the cheaper tier.
    """
    candidates = [t for t in allowed if t in p and t in cost]
    if not candidates:
        raise ValueError(
            f"no allowed tier ({', '.join(allowed) or 'none'}) has both a prediction and a cost"
        )
    top = max(cost.values())
    norm = {t: cost[t] / top if top > 0 else 0.0 for t in candidates}
    meeting = [t for t in candidates if p[t] >= floor]
    cheapest = min(meeting, key=lambda t: (cost[t], candidates.index(t))) if meeting else None
    if meeting:
        chosen = max(meeting, key=lambda t: (p[t] - lam * norm[t], -cost[t]))
    else:
        chosen = max(candidates, key=lambda t: (p[t], -cost[t]))
    return chosen, cheapest


# -- outcome rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One (sample, tier) outcome read back from an outcomes file."""

    id: str
    tier: str
    correct: bool
    question: str
    family: str
    image: bytes = field(repr=False)
    checkpoint: str = ""  # the reference checkpoint that answered, when recorded


def read_outcomes(path: Path) -> list[Outcome]:
    """Rows of a ``foveal bench outcomes`` file. A malformed row raises ValueError naming the
    file, its 1-based line and the field."""
    path = Path(path)
    images: dict[str, bytes] = {}
    rows: list[Outcome] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(_outcome(json.loads(line), path.parent, images))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            except (ValueError, OSError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    if not rows:
        raise ValueError(f"{path}: no outcome rows")
    return rows


def _outcome(obj: Any, base: Path, images: dict[str, bytes]) -> Outcome:
    if not isinstance(obj, dict):
        raise ValueError("row is not a JSON object")
    for k in ("id", "tier", "question", "image"):
        if not isinstance(obj.get(k), str) or not obj[k]:
            raise ValueError(f"field {k!r} must be a non-empty string")
    if not isinstance(obj.get("correct"), bool):
        raise ValueError("field 'correct' must be true or false")
    ref = obj["image"]
    data = images.get(ref)
    if data is None:
        m = _DATA_URI.fullmatch(ref)
        if m:
            try:
                data = base64.b64decode(m.group(1), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("field 'image': data URI is not valid base64") from None
        else:
            rel = Path(ref)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"field 'image': path {ref!r} must be relative to the file")
            data = (base / rel).read_bytes()
        images[ref] = data
    return Outcome(
        obj["id"],
        obj["tier"],
        obj["correct"],
        obj["question"],
        str(obj.get("family", "")),
        data,
        str(obj.get("checkpoint", "")),
    )


def request_from_outcome(o: Outcome, request_id: str = "train") -> ChatRequest:
    """The request a client would have sent for this row, validated by the edge's own code."""
    part = image_from_bytes(o.image, _LIMITS, param="image")
    return image_question(part, o.question, request_id=request_id, tenant="train")


# -- training sets --------------------------------------------------------------------------


@dataclass
class TrainingSet:
    X: np.ndarray  # (n, len(FEATURE_NAMES))
    tiers: np.ndarray  # (n,) tier names
    y: np.ndarray  # (n,) 1 = correct
    groups: np.ndarray  # (n,) sample / request ids: rows of one request stay together
    families: np.ndarray  # (n,) task family when known ("" otherwise), for reports
    source: str = ""

    def __len__(self) -> int:
        return len(self.y)


def training_set_from_outcomes(
    outcomes: Sequence[Outcome], extractor: FeatureExtractor | None = None, source: str = ""
) -> TrainingSet:
    """Features of every row, computed once per sample on the request path's code."""
    fx = extractor or FeatureExtractor()
    cache: dict[str, np.ndarray] = {}
    X = []
    for o in outcomes:
        v = cache.get(o.id)
        if v is None:
            v = cache[o.id] = fx.extract(request_from_outcome(o)).vector
        X.append(v)
    return TrainingSet(
        X=np.vstack(X),
        tiers=np.array([o.tier for o in outcomes]),
        y=np.array([int(o.correct) for o in outcomes]),
        groups=np.array([o.id for o in outcomes]),
        families=np.array([o.family for o in outcomes]),
        source=source,
    )


def training_set_from_store(url: str) -> TrainingSet:
    """Decisions with feedback (score >= 0.5 counts as correct) that recorded a feature vector
    of this features version; the tier is the one that answered."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from foveal.store.models import Decision, Feedback

    engine = create_engine(url)
    X, tiers, y, groups = [], [], [], []
    skipped = 0
    try:
        with Session(engine) as s:
            q = (
                select(Decision.request_id, Decision.tier, Decision.features, Feedback.score)
                .join(Feedback, Feedback.request_id == Decision.request_id)
                .where(Decision.outcome == "ok")
            )
            for request_id, tier, features, score in s.execute(q):
                vec = _recorded_vector(features)
                if vec is None:
                    skipped += 1
                    continue
                X.append(vec)
                tiers.append(tier)
                y.append(int(score >= 0.5))
                groups.append(request_id)
    finally:
        engine.dispose()
    if not X:
        raise ValueError(
            f"the store has no decisions with feedback and a recorded feature vector of "
            f"features version {FEATURES_VERSION} ({skipped} with feedback lacked one)"
        )
    n = len(y)
    return TrainingSet(
        np.vstack(X), np.array(tiers), np.array(y), np.array(groups), np.full(n, ""), "store"
    )


def _recorded_vector(features: Any) -> np.ndarray | None:
    if not isinstance(features, dict):
        return None
    summary = features.get("summary")
    if not isinstance(summary, dict) or summary.get("version") != FEATURES_VERSION:
        return None
    raw = features.get("vector")
    if not isinstance(raw, list) or len(raw) != len(FEATURE_NAMES):
        return None
    try:
        return np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return None


# -- metrics --------------------------------------------------------------------------------


def calibration_metrics(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, float]:
    """AUC, Brier score, expected calibration error (equal-width bins), log loss, base rate."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(y)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = sum(
        abs(float(p[idx == b].mean()) - float(y[idx == b].mean())) * (idx == b).mean()
        for b in range(bins)
        if (idx == b).any()
    )
    both = len(np.unique(y)) == 2
    return {
        "auc": round(float(roc_auc_score(y, p)), 4) if both else float("nan"),
        "brier": round(float(brier_score_loss(y, p)), 4),
        "ece": round(float(ece), 4),
        "log_loss": round(float(log_loss(y, p, labels=[0, 1])), 4),
        "base_rate": round(float(y.mean()), 4),
        "rows": int(len(y)),
    }


# -- the model ------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -30, 30))), dtype=np.float64)


def compile_trees(estimator: Any) -> dict[str, np.ndarray]:
    """A fitted binary ``HistGradientBoostingClassifier`` as flat node tables (numeric
    features only): every tree's nodes concatenated, child indices made global."""
    feat, thr, left, right, leaf, value, roots = [], [], [], [], [], [], []
    offset = 0
    for (tree,) in estimator._predictors:
        nodes = tree.nodes
        roots.append(offset)
        feat.append(nodes["feature_idx"].astype(np.int32))
        thr.append(nodes["num_threshold"].astype(np.float64))
        left.append(nodes["left"].astype(np.int32) + offset)
        right.append(nodes["right"].astype(np.int32) + offset)
        leaf.append(nodes["is_leaf"].astype(bool))
        value.append(nodes["value"].astype(np.float64))
        offset += len(nodes)
    return {
        "feature": np.concatenate(feat),
        "threshold": np.concatenate(thr),
        "left": np.concatenate(left),
        "right": np.concatenate(right),
        "is_leaf": np.concatenate(leaf),
        "value": np.concatenate(value),
        "roots": np.array(roots, dtype=np.int32),
        "baseline": np.asarray(estimator._baseline_prediction, dtype=np.float64).reshape(1),
    }


def trees_raw(t: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Decision function of compiled trees for rows X: all trees walked one level at a time."""
    n = X.shape[0]
    rows = np.arange(n)[:, None]
    idx = np.broadcast_to(t["roots"], (n, len(t["roots"]))).copy()
    while True:
        leaf = t["is_leaf"][idx]
        if leaf.all():
            break
        go_left = X[rows, t["feature"][idx]] <= t["threshold"][idx]
        step = np.where(go_left, t["left"][idx], t["right"][idx])
        idx = np.where(leaf, idx, step)
    return np.asarray(t["baseline"][0] + t["value"][idx].sum(axis=1), dtype=np.float64)


class SufficiencyModel:
    """Calibrated P(correct) per tier. Build with :func:`train_model`, or :meth:`load` one."""

    def __init__(
        self,
        tiers: Sequence[str],
        kind: str,
        params: dict[str, np.ndarray],
        calibration: dict[str, tuple[np.ndarray, np.ndarray]] | None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if kind not in ("hgb", "logreg"):
            raise ValueError(f"unknown model kind {kind!r}; expected hgb or logreg")
        self.tiers: tuple[str, ...] = tuple(tiers)
        self.kind = kind
        self._params = params
        self._calibration = calibration or {}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.features_version: str = self.metadata.get("features_version", FEATURES_VERSION)
        self.version: str = self.metadata.get("version", "unversioned")
        self._onehot = np.eye(len(self.tiers))

    def _raw(self, X: np.ndarray) -> np.ndarray:
        """Uncalibrated P(correct), (n, len(tiers))."""
        n, t = X.shape[0], len(self.tiers)
        if self.kind == "logreg":
            return _sigmoid(X @ self._params["coef"].T + self._params["intercept"])
        rows = np.hstack([np.repeat(X, t, axis=0), np.tile(self._onehot, (n, 1))])
        return _sigmoid(trees_raw(self._params, rows)).reshape(n, t)

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        """Calibrated P(correct), (n, len(tiers)), for feature vectors X (n, n_features)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"expected {len(FEATURE_NAMES)} features per row, got {X.shape[1]}")
        X = np.nan_to_num(X)
        if "mask" in self._params:  # a model trained on some feature groups only
            X = X * self._params["mask"]
        p = self._raw(X)
        for j, tier in enumerate(self.tiers):
            cal = self._calibration.get(tier)
            if cal is not None:
                p[:, j] = np.interp(p[:, j], cal[0], cal[1])
        return np.clip(p, 0.0, 1.0)

    def predict(self, f: RequestFeatures) -> dict[str, float]:
        """Calibrated P(correct) per tier for one request's features."""
        row = self.predict_many(f.vector[None, :])[0]
        return {t: float(row[j]) for j, t in enumerate(self.tiers)}

    # -- artifacts --------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write ``path`` (.npz) and its JSON sidecar ``path.with_suffix('.json')``."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: a sufficiency-model artifact is an .npz file")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            **self.metadata,
            "format": ARTIFACT_FORMAT,
            "kind": self.kind,
            "tiers": list(self.tiers),
            "features_version": self.features_version,
            "version": self.version,
        }
        arrays = {f"param_{k}": v for k, v in self._params.items()}
        for i, tier in enumerate(self.tiers):
            if tier in self._calibration:
                arrays[f"cal_x_{i}"], arrays[f"cal_y_{i}"] = self._calibration[tier]
        arrays["version"] = np.array(self.version)
        tmp = path.with_name(path.name + ".tmp.npz")
        savez: Any = np.savez_compressed  # (numpy's stub types **arrays as allow_pickle)
        savez(tmp, **arrays)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> SufficiencyModel:
        """The model at ``path``; ArtifactError names the problem (missing file, another format
        or features version) and what to do about it."""
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not path.is_file() or not sidecar.is_file():
            raise ArtifactError(
                f"no sufficiency model at {path} (needs {path.name} and {sidecar.name}); "
                "train one with `foveal router train --outcomes FILE --out PATH`"
            )
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{sidecar}: unreadable model metadata ({e})") from None
        _check_meta(meta, sidecar)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # a truncated or foreign file: say which
            raise ArtifactError(f"{path}: unreadable model artifact ({e})") from None
        if str(arrays.get("version")) != meta["version"]:
            raise ArtifactError(
                f"{path} and {sidecar.name} belong to different models (version "
                f"{arrays.get('version')} vs {meta['version']}); write both with "
                "`foveal router train`"
            )
        params = {k[6:]: v for k, v in arrays.items() if k.startswith("param_")}
        needed = ("coef", "intercept") if meta["kind"] == "logreg" else tuple(_TREE_KEYS)
        missing = [k for k in needed if k not in params]
        if missing:
            raise ArtifactError(f"{path}: artifact lacks {', '.join(missing)}")
        calibration = {
            tier: (arrays[f"cal_x_{i}"], arrays[f"cal_y_{i}"])
            for i, tier in enumerate(meta["tiers"])
            if f"cal_x_{i}" in arrays
        }
        return cls(meta["tiers"], meta["kind"], params, calibration, meta)

    @classmethod
    def default(cls) -> SufficiencyModel:
        """The artifact shipped with the package (trained on the reference suite's train split)."""
        return _load_cached(str(DEFAULT_ARTIFACT))


_TREE_KEYS = ("feature", "threshold", "left", "right", "is_leaf", "value", "roots", "baseline")


@lru_cache(maxsize=8)
def _load_cached(path: str) -> SufficiencyModel:
    return SufficiencyModel.load(Path(path))


def _check_meta(meta: Any, where: Path) -> None:
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}: model metadata is not a JSON object")
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{where}: artifact format {meta.get('format')!r}, this router reads format "
            f"{ARTIFACT_FORMAT}; retrain with `foveal router train`"
        )
    if meta.get("features_version") != FEATURES_VERSION:
        raise ArtifactError(
            f"{where}: the model was trained on features version "
            f"{meta.get('features_version')!r} but this router computes {FEATURES_VERSION!r}; "
            "retrain it with `foveal router train` (see docs/routing.md)"
        )
    for k in ("tiers", "kind", "version"):
        if k not in meta:
            raise ArtifactError(f"{where}: model metadata lacks {k!r}")
    if meta["kind"] not in ("hgb", "logreg"):
        raise ArtifactError(f"{where}: unknown model kind {meta['kind']!r}")


# -- training -------------------------------------------------------------------------------


def _fit_raw(
    ts: TrainingSet, idx: np.ndarray, tiers: Sequence[str], kind: str, seed: int
) -> dict[str, np.ndarray]:
    """Fit the uncalibrated model on rows ``idx``."""
    X, t, y = ts.X[idx], ts.tiers[idx], ts.y[idx]
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        coef = np.zeros((len(tiers), X.shape[1]))
        intercept = np.zeros(len(tiers))
        for j, tier in enumerate(tiers):
            m = t == tier
            yt = y[m]
            if len(np.unique(yt)) < 2:  # all right or all wrong: a constant (smoothed) rate
                rate = (yt.sum() + 0.5) / (len(yt) + 1.0)
                intercept[j] = math.log(rate / (1 - rate))
                continue
            lr = LogisticRegression(C=1.0, max_iter=2000)
            lr.fit(X[m], yt)
            coef[j], intercept[j] = lr.coef_[0], lr.intercept_[0]
        return {"coef": coef, "intercept": intercept}
    from sklearn.ensemble import HistGradientBoostingClassifier

    onehot = np.eye(len(tiers))[[list(tiers).index(x) for x in t]]
    est = HistGradientBoostingClassifier(
        max_iter=100,
        learning_rate=0.06,
        max_leaf_nodes=15,
        min_samples_leaf=20,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=seed,
    )
    est.fit(np.hstack([X, onehot]), y)
    return compile_trees(est)


def _fit_calibration(
    raw: np.ndarray, ts: TrainingSet, idx: np.ndarray, tiers: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One isotonic map per tier from out-of-fold raw predictions (rows ``idx``)."""
    from sklearn.isotonic import IsotonicRegression

    out = {}
    for j, tier in enumerate(tiers):
        m = ts.tiers[idx] == tier
        if m.sum() < 20 or len(np.unique(ts.y[idx][m])) < 2:
            continue
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(raw[m, j], ts.y[idx][m])
        out[tier] = (
            np.asarray(iso.X_thresholds_, dtype=np.float64),
            np.asarray(iso.y_thresholds_, dtype=np.float64),
        )
    return out


def _row_predictions(model: SufficiencyModel, ts: TrainingSet, idx: np.ndarray) -> np.ndarray:
    """P(correct) of each row's own tier."""
    p = model.predict_many(ts.X[idx])
    col = np.array([model.tiers.index(t) for t in ts.tiers[idx]])
    return p[np.arange(len(idx)), col]


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(uniq, rng.permutation(len(uniq)) % k, strict=True))
    f = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(f == i) for i in range(k)]


def _fit(
    ts: TrainingSet, idx: np.ndarray, tiers: Sequence[str], kind: str, calibrate: bool, seed: int
) -> SufficiencyModel:
    calibration = None
    if calibrate:  # out-of-fold raw predictions -> isotonic maps; then refit on all of idx
        raw = np.zeros((len(idx), len(tiers)))
        sub = TrainingSet(ts.X[idx], ts.tiers[idx], ts.y[idx], ts.groups[idx], ts.families[idx])
        for fold in _folds(sub.groups, 3, seed):
            rest = np.setdiff1d(np.arange(len(idx)), fold)
            m = SufficiencyModel(tiers, kind, _fit_raw(sub, rest, tiers, kind, seed), None)
            raw[fold] = m._raw(sub.X[fold])
        calibration = _fit_calibration(raw, sub, np.arange(len(idx)), tiers)
    return SufficiencyModel(tiers, kind, _fit_raw(ts, idx, tiers, kind, seed), calibration)


def train_model(
    ts: TrainingSet,
    *,
    kind: str = "hgb",
    calibrate: bool = True,
    holdout: float = 0.2,
    seed: int = 0,
    version: str | None = None,
    feature_groups: Sequence[str] = tuple(FEATURE_GROUPS),
) -> SufficiencyModel:
    """Fit on all rows; the metadata's metrics come from a fit on the other rows, scored on a
    held-out ``holdout`` share of the samples (all tiers of a sample on the same side).

    ``feature_groups`` (of ``FEATURE_GROUPS``: image, text, session) limits what the model sees,
    e.g. an image-only or text-only model for comparisons; the others are zeroed at training and
    at prediction time alike."""
    tiers = _tier_order(np.unique(ts.tiers))
    if len(np.unique(ts.y)) < 2:
        raise ValueError("the outcomes are all correct or all wrong: nothing to learn")
    unknown = [g for g in feature_groups if g not in FEATURE_GROUPS]
    if unknown or not feature_groups:
        raise ValueError(
            f"feature groups {list(feature_groups)}: expected some of {', '.join(FEATURE_GROUPS)}"
        )
    mask = np.isin(FEATURE_NAMES, [n for g in feature_groups for n in FEATURE_GROUPS[g]])
    if not mask.all():
        ts = TrainingSet(ts.X * mask, ts.tiers, ts.y, ts.groups, ts.families, ts.source)
    metrics: dict[str, Any] = {}
    if holdout > 0:
        k = max(2, round(1 / holdout))
        test = _folds(ts.groups, k, seed + 1)[0]
        train = np.setdiff1d(np.arange(len(ts)), test)
        m = _fit(ts, train, tiers, kind, calibrate, seed)
        p = _row_predictions(m, ts, test)
        metrics = {"holdout": calibration_metrics(p, ts.y[test]), "per_tier": {}}
        for tier in tiers:
            sel = ts.tiers[test] == tier
            if sel.any():
                metrics["per_tier"][tier] = calibration_metrics(p[sel], ts.y[test][sel])
    model = _fit(ts, np.arange(len(ts)), tiers, kind, calibrate, seed)
    if not mask.all():
        model._params["mask"] = mask.astype(np.float64)
    created = datetime.now(UTC).replace(microsecond=0)
    model.version = version or f"{kind}-{created.strftime('%Y%m%dT%H%M%SZ')}"
    model.metadata = {
        "version": model.version,
        "features_version": FEATURES_VERSION,
        "created": created.isoformat(),
        "kind": kind,
        "calibrated": calibrate,
        "feature_groups": sorted(feature_groups),
        "tiers": list(tiers),
        "training_rows": len(ts),
        "training_samples": int(len(np.unique(ts.groups))),
        "source": ts.source,
        "metrics": metrics,
    }
    return model


def _tier_order(tiers: Iterable[str]) -> list[str]:
    """Tier names cheapest first when they are ``t<k>``, else alphabetical."""

    def key(t: str) -> tuple[int, str]:
        m = re.fullmatch(r"t(\d+)", t)
        return (int(m.group(1)) if m else 1 << 30, t)

    return sorted(tiers, key=key)
