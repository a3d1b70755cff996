"""Routing policies: pick a tier for a request.

A policy is anything with ``select(ctx) -> Decision`` and ``update(reward)``; policies are chosen
by name from :data:`POLICIES`. The rule policy below is the first real one; the learned
sufficiency-model and bandit policies plug in behind the same interface.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from foveal.config import PolicySettings
from foveal.pools.catalog import Catalog
from foveal.router.requests import ChatRequest
from foveal.router.tenant_policy import TenantPolicy

__all__ = [
    "POLICIES",
    "Decision",
    "DecisionContext",
    "Policy",
    "Reward",
    "RulePolicy",
    "make_policy",
    "register_policy",
]


@dataclass(frozen=True, slots=True)
class DecisionContext:
    request: ChatRequest
    catalog: Catalog  # never empty: the core answers 503 itself when no tier is known
    tenant_policy: TenantPolicy | None = None  # λ, floor, budget... (core enforces tiers)
    previous_tier: str | None = None  # the tier that answered this session's previous turn


@dataclass(frozen=True, slots=True)
class Decision:
    tier: str
    policy: str
    reason: str
    propensity: float = 1.0  # probability the policy had of choosing this tier
    features: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)  # P(correct) per tier, if known


@dataclass(frozen=True, slots=True)
class Reward:
    request_id: str
    tenant: str
    tier: str
    score: float  # 0..1 from feedback
    features: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    name: str

    def select(self, ctx: DecisionContext) -> Decision: ...

    def update(self, reward: Reward) -> None: ...


PolicyFactory = Callable[[PolicySettings], Policy]
POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(factory: PolicyFactory) -> PolicyFactory:
        POLICIES[name] = factory
        return factory

    return deco


#: Modules whose policies register themselves on import (loaded on first use, so importing
#: this module stays cheap and free of cycles).
BUILTIN_POLICY_MODULES = ("foveal.router.model_policy", "foveal.router.bandit_policy")


def make_policy(settings: PolicySettings) -> Policy:
    if settings.name not in POLICIES:
        for module in BUILTIN_POLICY_MODULES:
            importlib.import_module(module)
    try:
        factory = POLICIES[settings.name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown policy {settings.name!r}; known: {known}") from None
    return factory(settings)


def _keyword_pattern(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w.lower()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b")


@register_policy("rules")
class RulePolicy:
    """Pinned tier if the request names one; else rules on the prompt and the image size.

    1. ``model`` is a tier name -> that tier.
    2. No image -> the lowest tier (no visual tokens to spend).
    3. Reading words (read, text, document, chart, ...) -> the high tier (top by default).
    4. Very large images -> one tier above the default; all-small images with a general
       prompt -> the low tier.
    5. Otherwise the default tier (the middle one unless configured).
    """

    name = "rules"

    def __init__(self, settings: PolicySettings) -> None:
        self._settings = settings
        self._high = _keyword_pattern(settings.high_keywords)
        self._low = _keyword_pattern(settings.low_keywords)

    def select(self, ctx: DecisionContext) -> Decision:
        req, names = ctx.request, ctx.catalog.names
        images = req.images
        features = {
            "images": len(images),
            "max_pixels": max((i.pixels for i in images), default=0),
            "prompt_chars": len(req.prompt_text),
            "turn": req.turn_index,
        }

        def pick(tier: str, reason: str) -> Decision:
            return Decision(tier=tier, policy=self.name, reason=reason, features=features)

        if req.pinned:
            return pick(req.model, "pinned by request")
        if not images:
            return pick(names[0], "no image")
        text = req.prompt_text.lower()
        s = self._settings  # configured tiers a watched catalog lacks fall back to the defaults
        high = _known(s.high_tier, names) or names[-1]
        if self._high is not None and (m := self._high.search(text)):
            return pick(high, f"reading keyword {m.group(0)!r}")
        default = _known(s.default_tier, names) or names[(len(names) - 1) // 2]
        if features["max_pixels"] > self._settings.large_image_pixels:
            i = min(names.index(default) + 1, len(names) - 1)
            return pick(names[i], "large image")
        general = self._low is not None and self._low.search(text) is not None
        if general or features["max_pixels"] <= self._settings.small_image_pixels:
            low = _known(s.low_tier, names) or names[0]
            return pick(low, "general question" if general else "small image")
        return pick(default, "default tier")

    def update(self, reward: Reward) -> None:
        """Rules do not learn."""


def _known(tier: str | None, names: list[str]) -> str | None:
    return tier if tier in names else None
