"""The autoscaler's arithmetic: demand + spec + replica count + clock -> desired replicas.

Pure and deterministic: the caller passes the time and carries :class:`ScalingState` from one
pass to the next, so bursts, idleness, wake-up and flapping are unit-tested as sequences.

The rules (also in docs/operator.md):

1. raw = max(ceil(inFlight / targetInFlightPerReplica),
             ceil(requestsPerSecond / targetRequestsPerSecondPerReplica))   # 2nd term optional
   and raw >= 1 whenever there is any demand.
2. Stabilization, like the Kubernetes HPA's ``behavior``: the recommendation history keeps one
   raw value per pass. Scale up only to the *lowest* raw value over the last
   ``scaleUpStabilizationSeconds`` (the need must be sustained), scale down only to the
   *highest* raw value over the last ``scaleDownStabilizationSeconds``.
3. Idleness: with ``minReplicas == 0`` a pool scales to zero once no demand was seen for
   ``idleSecondsToZero``; before that it keeps at least one replica. That idle period is the
   stabilization of this step, so the down window does not add to it.
4. Wake: a pool at zero replicas with demand (counted for its cold tier too) gets one replica at
   once; the up window applies beyond that first replica.
5. Unknown or stale demand (no router answered, or a router that answered before is down now)
   never scales down: the pool holds its size until the routers report again.
6. The result is clamped to [minReplicas, maxReplicas].

A fresh state (operator start) is seeded with the current replica count, so a restart neither
scales up nor down sooner than the windows allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from foveal.api.crds import ScalingSpec

__all__ = [
    "DemandObservation",
    "ScalingDecision",
    "ScalingState",
    "decide",
    "raw_recommendation",
]

_EPS = 1e-9  # 8.0 / 4 must not become 3 replicas through float noise in ceil()


@dataclass(frozen=True, slots=True)
class DemandObservation:
    """The demand routers report for one tier, summed over routers.

    ``stale`` is true when part of it is a last-known value (a router did not answer) or the
    request rate is not known yet (the first scrape of a counter has no delta).
    """

    requests_per_second: float
    in_flight: float
    stale: bool = False

    @property
    def active(self) -> bool:
        return self.requests_per_second > _EPS or self.in_flight > _EPS


@dataclass(frozen=True, slots=True)
class ScalingState:
    """What the autoscaler remembers about one pool between passes (in memory only)."""

    history: tuple[tuple[float, int], ...] = ()  # (time, raw recommendation), oldest first
    last_demand_at: float | None = None  # when demand was last seen (None: not since start)
    seeded: bool = False


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    desired: int
    reason: str  # a sentence for people (status message, event)
    raw: int  # rule-1 recommendation of this pass (after the idle floor)
    state: ScalingState = field(repr=False)
    code: str = "Stable"  # CamelCase reason for the Scaling condition


def _ceil_div(value: float, per_replica: float) -> int:
    return max(0, math.ceil(value / per_replica - _EPS))


def raw_recommendation(demand: DemandObservation, scaling: ScalingSpec) -> int:
    """Rule 1: replicas the demand needs right now, before stabilization and clamps."""
    need = _ceil_div(demand.in_flight, scaling.target_in_flight_per_replica)
    if scaling.target_requests_per_second_per_replica is not None:
        need = max(
            need,
            _ceil_div(demand.requests_per_second, scaling.target_requests_per_second_per_replica),
        )
    if demand.active:
        need = max(need, 1)
    return need


def _clamp(n: int, low: int, high: int) -> int:
    return max(low, min(n, high))


def decide(
    *,
    scaling: ScalingSpec,
    min_replicas: int,
    max_replicas: int,
    current: int,
    demand: DemandObservation | None,
    state: ScalingState,
    now: float,
) -> ScalingDecision:
    """One autoscaler pass for one pool. ``now`` is seconds on a monotonic clock.

    ``demand`` None means no router has reported at all (unknown): the pool holds its size.
    Returns the desired replica count, a human-readable reason and the state to carry on.
    """
    if not state.seeded:
        # Rule: a restart starts both windows with the current size, and an already running
        # pool starts its idle clock now (a cold pool stays cold until demand appears).
        state = ScalingState(
            history=((now, current),),
            last_demand_at=None,
            seeded=True,
        )
    if state.last_demand_at is None and current > 0:
        # A running pool (or one scaled by hand) starts its idle clock now; a cold pool stays
        # cold until demand appears.
        state = replace(state, last_demand_at=now)
    low, high = min_replicas, max(max_replicas, min_replicas)

    if demand is None:
        desired = _clamp(current, low, high)
        if desired != current:
            return ScalingDecision(
                desired, _clamp_reason(desired, current, low), current, state, "Clamped"
            )
        why = "demand unknown (no router has reported yet); holding"
        return ScalingDecision(desired, why, current, state, "DemandUnknown")

    if demand.active or demand.stale:
        # Stale numbers cannot prove idleness: the idle clock restarts once routers answer.
        state = replace(state, last_demand_at=now)
    raw = raw_recommendation(demand, scaling)
    idle_for = None if state.last_demand_at is None else now - state.last_demand_at
    idle = not demand.active and (idle_for is None or idle_for >= scaling.idle_seconds_to_zero)
    # (idle_for is None only for a pool that was at zero since start and saw no demand.)
    kept_for_idle = raw == 0 and not idle and current > 0
    if kept_for_idle:
        raw = 1  # rule 3: keep a replica until the idle period has passed

    horizon = now - max(scaling.scale_up_stabilization_seconds,
                        scaling.scale_down_stabilization_seconds)  # fmt: skip
    history = tuple(h for h in state.history if h[0] > horizon) + ((now, raw),)
    state = replace(state, history=history)

    up_cut = now - scaling.scale_up_stabilization_seconds
    down_cut = now - scaling.scale_down_stabilization_seconds
    up_rec = min([r for t, r in history if t > up_cut] or [raw])
    down_rec = max([r for t, r in history if t > down_cut] or [raw])

    desired = current
    if desired < up_rec:
        desired = up_rec
    if desired > down_rec:
        desired = down_rec
    reason, code = "", ""
    if current == 0 and demand.active and desired == 0:
        desired, code = 1, "Wake"
        reason = f"wake 0 -> 1: demand for a tier at zero replicas ({_load(demand)})"
    if raw == 0 and idle and min_replicas == 0 and current > 0:
        desired, code = 0, "ScaleToZero"
        reason = (
            f"scale to zero: no demand for {idle_for or 0.0:.0f}s "
            f"(idleSecondsToZero {scaling.idle_seconds_to_zero})"
        )
    if demand.stale and desired < current:
        desired, code = current, "StaleDemand"
        reason = f"demand is stale (a router did not answer); not scaling down from {current}"

    clamped = _clamp(desired, low, high)
    if clamped != desired:
        return ScalingDecision(clamped, _clamp_reason(clamped, desired, low), raw, state, "Clamped")
    if not code:
        code, reason = _reason(desired, current, raw, demand, down_rec)
        if code == "ScaleUp" and current == 0:
            code, reason = "Wake", "wake: " + reason
        elif demand.stale and desired == current:
            code = "StaleDemand"
            reason = f"demand is stale (a router did not answer): {reason}"
        if code == "Stable" and kept_for_idle and min_replicas == 0:
            reason = (
                f"stable at {current}: no demand for {idle_for or 0.0:.0f}s; scales to zero "
                f"after idleSecondsToZero ({scaling.idle_seconds_to_zero}s)"
            )
    return ScalingDecision(desired, reason, raw, state, code)


def _clamp_reason(desired: int, wanted: int, low: int) -> str:
    if desired == wanted:
        return f"stable at {desired}"
    bound = "minReplicas" if desired == low and wanted < desired else "maxReplicas"
    return f"clamped to {bound} ({desired}; demand asks for {wanted})"


def _load(demand: DemandObservation) -> str:
    return f"{demand.in_flight:g} in flight, {demand.requests_per_second:.3g} req/s"


def _reason(
    desired: int, current: int, raw: int, demand: DemandObservation, down_rec: int
) -> tuple[str, str]:
    load = _load(demand)
    if desired > current:
        return "ScaleUp", f"scale up {current} -> {desired}: {load}"
    if desired < current:
        return "ScaleDown", f"scale down {current} -> {desired}: {load}"
    if raw > current:
        return "Stabilizing", (
            f"holding {current}: the need for {raw} is not sustained for the scale-up "
            f"window yet; {load}"
        )
    if raw < current and down_rec >= current:
        return "Stabilizing", (
            f"holding {current}: demand needs {raw}, waiting for the scale-down window; {load}"
        )
    return "Stable", f"stable at {current}: {load}"
