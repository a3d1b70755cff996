"""Cascade: answer at the chosen tier; if the answer looks unsure, ask once more one tier up.

The confidence of an answer is its **geometric-mean token probability**,
``exp(mean(token log-probabilities))``, in [0, 1]: the pool's OpenAI ``logprobs`` object gives
the log-probability of each generated token. The mean log-probability (not the minimum token
probability) is used because one unusual but correct token (a name, a number) should not
escalate an otherwise confident answer. An answer with no token log-probabilities (empty
answer, or a pool that ignores ``logprobs``) has no confidence and is kept.

Escalation goes to the allowed tiers above the tier that answered, nearest first (a down or
saturated next tier falls back further up, never down). If no higher tier can answer, the
first answer is returned: a cascade never turns an answer into an error. Every answer's cost
and pool time count in the decision record; ``features["cascade"]`` says what happened.

Only auto-routed, non-streamed requests cascade: a pinned tier is the client's choice, and a
stream's first tokens are already on their way to the client when its confidence is known.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from foveal import metrics
from foveal.errors import FovealError
from foveal.pools.client import PoolResult
from foveal.router.tenant_policy import CascadePolicy, TenantPolicy

__all__ = ["CascadeRun", "answer_confidence", "higher_tiers", "run_cascade"]

log = logging.getLogger(__name__)

Complete = Callable[[list[str]], Awaitable[PoolResult]]


def answer_confidence(body: Mapping[str, Any]) -> float | None:
    """exp(mean token log-probability) of a chat.completion's first choice; None if unknown."""
    try:
        content = body["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, list) or not content:
        return None
    total = 0.0
    for entry in content:
        lp = entry.get("logprob") if isinstance(entry, Mapping) else None
        if isinstance(lp, bool) or not isinstance(lp, int | float) or math.isnan(lp):
            return None
        total += min(float(lp), 0.0)
    return math.exp(total / len(content))


def higher_tiers(tier: str, names: Sequence[str], policy: TenantPolicy) -> list[str]:
    """The allowed tiers above ``tier`` in catalog order (cheapest first), nearest first."""
    if tier not in names:
        return []
    i = list(names).index(tier)
    return [t for t in names[i + 1 :] if policy.allows(t)]


@dataclass(slots=True)
class CascadeRun:
    """The answer to return, every answer received (first first), and the record's summary."""

    result: PoolResult
    answers: list[PoolResult]
    info: dict[str, Any] = field(default_factory=dict)


async def run_cascade(
    first: PoolResult,
    policy: CascadePolicy,
    complete: Complete,
    higher: Callable[[str], list[str]],
) -> CascadeRun:
    """Escalate ``first`` while its confidence is below the threshold (see the module doc).

    ``complete(tiers)`` asks the pools (first tier that answers wins); ``higher(tier)`` lists
    the tiers to try above ``tier``. Cancellation propagates; pool errors end the cascade with
    the last answer kept.
    """
    confidence = answer_confidence(first.body)
    info: dict[str, Any] = {
        "threshold": policy.threshold,
        "first_tier": first.tier,
        "confidence": _round(confidence),
        "escalated_to": None,
        "steps": [{"tier": first.tier, "confidence": _round(confidence)}],
    }
    run = CascadeRun(first, [first], info)
    current, conf = first, confidence
    for _ in range(policy.max_escalations):
        if conf is None:
            info["stopped"] = "no token log-probabilities in the answer"
            break
        if conf >= policy.threshold:
            break
        tiers = higher(current.tier)
        if not tiers:
            info["stopped"] = f"no allowed tier above {current.tier}"
            break
        try:
            answer = await complete(tiers)
        except FovealError as exc:
            info["error"] = f"{type(exc).__name__}: {exc.message}"
            log.info("cascade from %s kept the first answer: %s", current.tier, exc.message)
            break
        conf = answer_confidence(answer.body)
        run.answers.append(answer)
        info["steps"].append({"tier": answer.tier, "confidence": _round(conf)})
        info["escalated_to"] = answer.tier
        current = answer
    run.result = current
    result = "escalated" if len(run.answers) > 1 else ("failed" if "error" in info else "kept")
    metrics.CASCADE_TOTAL.labels(first.tier, result).inc()
    return run


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
