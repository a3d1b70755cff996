"""The ``model`` policy: the cheapest tier the sufficiency model predicts to be good enough.

For each request: features (:class:`~foveal.router.features.FeatureExtractor`), the calibrated
P(correct) of every catalog tier the model knows (:class:`SufficiencyModel`), then
:func:`~foveal.router.sufficiency.choose_tier` under the tenant's policy: maximise
P(correct) - λ·cost/max(cost) over the allowed tiers that meet the quality floor (the highest P
when none does). Deterministic, unless the tenant policy sets an exploration algorithm and rate:
then a share ``rate`` of requests go to a uniformly drawn allowed tier (ε-greedy), and the
decision's propensity says how likely its tier was.

Pinned requests keep their pin and requests without an image go to the lowest allowed tier; both
still record their features and predictions, so every decision with feedback can train the next
model (``foveal router train --store``). Catalog tiers the model was not trained on get no
prediction; if the model knows none of the allowed tiers, the rule policy decides and the reason
says why.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from foveal.config import PolicySettings
from foveal.router.features import FeatureExtractor, RequestFeatures
from foveal.router.policies import (
    Decision,
    DecisionContext,
    Reward,
    RulePolicy,
    register_policy,
)
from foveal.router.sufficiency import SufficiencyModel, choose_tier

__all__ = ["ModelPolicy", "decision_features"]


def decision_features(f: RequestFeatures, **extra: Any) -> dict[str, Any]:
    """What every learned policy records: the features summary, the bandit context and the full
    vector (4 decimals: enough to retrain from the store), plus ``extra``."""
    return {
        "summary": f.summary,
        "context": np.round(f.context, 4).tolist(),
        "vector": np.round(f.vector, 4).tolist(),
        **extra,
    }


@register_policy("model")
class ModelPolicy:
    name = "model"

    def __init__(
        self,
        settings: PolicySettings,
        model: SufficiencyModel | None = None,
        extractor: FeatureExtractor | None = None,
        seed: int | None = None,
    ) -> None:
        path = settings.model_path
        if model is None:
            model = SufficiencyModel.load(Path(path)) if path else SufficiencyModel.default()
        self.model = model
        self.extractor = extractor or FeatureExtractor()
        self._rules = RulePolicy(settings)
        self._rng = random.Random(seed)

    def select(self, ctx: DecisionContext) -> Decision:
        req, catalog, tp = ctx.request, ctx.catalog, ctx.tenant_policy
        names = catalog.names
        lam = tp.quality_weight if tp else 0.0
        floor = tp.quality_floor if tp else 0.0
        allowed = [t for t in names if tp is None or tp.allows(t)] or names
        f = self.extractor.extract(req, ctx.previous_tier)
        known = [t for t in names if t in self.model.tiers]
        unknown = [t for t in names if t not in self.model.tiers]
        predicted: dict[str, float] = {}
        if known and req.images:
            p = self.model.predict(f)
            predicted = {t: round(p[t], 4) for t in known}
        base = {
            "model_version": self.model.version,
            "quality_weight": lam,
            "quality_floor": floor,
            "cheapest_meeting_floor": None,
        }
        if unknown:
            base["unpredicted_tiers"] = unknown  # tiers the model was not trained on

        def decide(tier: str, reason: str, chosen_by: str, propensity: float = 1.0) -> Decision:
            return Decision(
                tier=tier,
                policy=self.name,
                reason=reason,
                propensity=propensity,
                features=decision_features(f, **base, chosen_by=chosen_by),
                predicted=predicted,
            )

        if req.pinned:
            return decide(req.model, "pinned by request", "pin")
        if not req.images:
            return decide(allowed[0], "no image: the lowest allowed tier", "no-image")
        candidates = [t for t in allowed if t in predicted]
        if not candidates:
            rule = self._rules.select(ctx)
            why = (
                f"the sufficiency model ({self.model.version}) knows none of the allowed tiers "
                f"{', '.join(allowed)} (it knows {', '.join(self.model.tiers)})"
            )
            return decide(rule.tier, f"rules: {rule.reason}; {why}", "rules")
        cost = {t.name: t.cost_weight for t in catalog.tiers}
        greedy, cheapest = choose_tier(predicted, cost, lam, floor, candidates)
        base["cheapest_meeting_floor"] = cheapest
        explore = tp.exploration if tp else None
        eps = explore[1] if explore and explore[0] != "none" else 0.0
        if eps > 0 and self._rng.random() < eps:
            tier = self._rng.choice(candidates)
            share = eps / len(candidates)
            return decide(
                tier,
                f"exploring (ε={eps:g}): {tier} drawn uniformly; greedy choice {greedy}",
                "explore",
                share + (1 - eps) if tier == greedy else share,
            )
        prop = 1 - eps + eps / len(candidates)
        if cheapest is None:
            reason = (
                f"no allowed tier is predicted to meet the floor {floor:g}: the most likely "
                f"{greedy} (P={predicted[greedy]:.2f})"
            )
            return decide(greedy, reason, "floor-unmet", prop)
        reason = f"P(correct)={predicted[greedy]:.2f} at {greedy} (λ={lam:g}, floor={floor:g})"
        return decide(greedy, reason, "model", prop)

    def update(self, reward: Reward) -> None:
        """The sufficiency model learns offline (`foveal router train`), not per request."""
