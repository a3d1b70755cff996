"""The explanation of one routing decision: the explicit fields both Explain APIs show.

A decision record keeps what the policy and the core knew in its ``features`` JSON. This module
reads the parts a person asks about (why this tier, what was predicted, which floors applied,
what the cascade did) into one flat, typed view, the same for ``GET /v1/decisions/{id}``
(``explanation`` object) and gRPC ``Explain`` (``DecisionRecord.explanation``). A value the
record does not hold is ``None`` (JSON null, an unset proto field): a rule-based decision has
no predictions, a request outside a session has no session part.

Where a value comes from:

- λ and the quality floor: what the learned policy used (``features["quality_weight"]``,
  ``features["quality_floor"]``), else the tenant policy in force (``features
  ["tenant_policy"]``);
- the features summary: the learned policy's ``features["summary"]``, else the core's own
  summary of the request (images, image sizes, prompt length, turn);
- ``cheapest_meeting_floor`` and ``chosen_by``: written by the learned policies only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from foveal.store.records import DecisionRecord

__all__ = ["CascadeExplanation", "Explanation", "SessionExplanation", "explain_record"]

_CORE_SUMMARY = ("images", "image_sizes", "prompt_chars", "turn")


@dataclass(frozen=True, slots=True)
class SessionExplanation:
    key: str  # a hash of (tenant, session id): the raw id is not recorded
    previous_tier: str | None  # the tier that answered the session's previous turn, if known
    floor_tier: str | None  # the lowest tier this turn could use because of the session
    floor_applied: bool  # the policy chose lower and the session floor raised it


@dataclass(frozen=True, slots=True)
class CascadeExplanation:
    threshold: float | None
    first_tier: str | None  # the tier of the first answer
    confidence: float | None  # its exp(mean token log-probability)
    escalated_to: str | None  # the tier of the answer returned, when it was re-asked
    skipped: str | None  # why the request did not cascade ("stream", "pinned")
    error: str | None  # why an escalation failed (the first answer was kept)


@dataclass(frozen=True, slots=True)
class Explanation:
    policy: str
    chosen_by: str | None
    chosen_tier: str
    answering_tier: str
    propensity: float
    quality_weight: float | None  # λ
    quality_floor: float | None
    predicted: dict[str, float] | None  # P(correct) per tier
    cheapest_meeting_floor: str | None
    features_summary: dict[str, Any] | None
    session: SessionExplanation | None
    cascade: CascadeExplanation | None
    fallback_excluded: dict[str, str] | None  # fallback tiers the floors ruled out, and why

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with null for what the record does not hold."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, SessionExplanation | CascadeExplanation):
                value = {k: getattr(value, k) for k in value.__slots__}
            out[name] = value
        return out


def explain_record(record: DecisionRecord) -> Explanation:
    """The explanation of ``record`` (see the module docstring)."""
    f = record.features
    tp = _mapping(f.get("tenant_policy"))
    summary = _mapping(f.get("summary"))
    if not summary:
        summary = {k: f[k] for k in _CORE_SUMMARY if k in f}
    excluded = _mapping(f.get("fallback_excluded"))
    return Explanation(
        policy=record.policy,
        chosen_by=_str(f.get("chosen_by")),
        chosen_tier=record.chosen_tier,
        answering_tier=record.tier,
        propensity=record.propensity,
        quality_weight=_num(f.get("quality_weight", tp.get("quality_weight"))),
        quality_floor=_num(f.get("quality_floor", tp.get("quality_floor"))),
        predicted={str(k): float(v) for k, v in record.predicted.items()} or None,
        cheapest_meeting_floor=_str(f.get("cheapest_meeting_floor")),
        features_summary=dict(summary) or None,
        session=_session(f.get("session")),
        cascade=_cascade(f.get("cascade")),
        fallback_excluded={str(k): str(v) for k, v in excluded.items()} or None,
    )


def _session(raw: Any) -> SessionExplanation | None:
    if not isinstance(raw, Mapping):
        return None
    return SessionExplanation(
        key=str(raw.get("key") or ""),
        previous_tier=_str(raw.get("previous_tier")),
        floor_tier=_str(raw.get("floor_tier")),
        floor_applied=bool(raw.get("floor_applied")),
    )


def _cascade(raw: Any) -> CascadeExplanation | None:
    if not isinstance(raw, Mapping):
        return None
    return CascadeExplanation(
        threshold=_num(raw.get("threshold")),
        first_tier=_str(raw.get("first_tier")),
        confidence=_num(raw.get("confidence")),
        escalated_to=_str(raw.get("escalated_to")),
        skipped=_str(raw.get("skipped")),
        error=_str(raw.get("error")),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
