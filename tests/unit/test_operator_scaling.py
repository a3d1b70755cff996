"""The autoscaler's arithmetic as sequences: bursts, idleness, wake-up, flapping, clamps."""

from __future__ import annotations

from typing import Any

from foveal.api.crds import ScalingSpec
from foveal.operator.scaling import (
    DemandObservation,
    ScalingState,
    decide,
    raw_recommendation,
)

D = DemandObservation


def scaling(**over: Any) -> ScalingSpec:
    base = {
        "targetInFlightPerReplica": 4,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 60,
        "idleSecondsToZero": 120,
    }
    return ScalingSpec.model_validate({**base, **over})


def run(
    samples: list[tuple[float, D | None]],
    *,
    spec: ScalingSpec,
    start: int,
    min_replicas: int = 0,
    max_replicas: int = 10,
) -> list[tuple[float, int, str]]:
    """Feed demand samples in time order, applying each decision; returns (t, replicas, code)."""
    state, current, out = ScalingState(), start, []
    for t, demand in samples:
        d = decide(
            scaling=spec,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            current=current,
            demand=demand,
            state=state,
            now=t,
        )
        assert d.reason, "every decision explains itself"
        state, current = d.state, d.desired
        out.append((t, current, d.code))
    return out


def replicas(trace: list[tuple[float, int, str]]) -> list[int]:
    return [r for _, r, _ in trace]


def test_raw_recommendation_uses_the_larger_signal() -> None:
    s = scaling(targetRequestsPerSecondPerReplica=2)
    assert raw_recommendation(D(0, 0), s) == 0
    assert raw_recommendation(D(0, 0.1), s) == 1  # any demand needs a replica
    assert raw_recommendation(D(0, 8), s) == 2  # 8 / 4 is exactly 2, not 3
    assert raw_recommendation(D(0, 9), s) == 3
    assert raw_recommendation(D(7, 1), s) == 4  # 7 req/s / 2 per replica
    assert raw_recommendation(D(7, 1), scaling()) == 1  # no rps target: in-flight only


def test_burst_scales_up_at_once_and_is_clamped_to_max() -> None:
    trace = run(
        [(0, D(0, 4)), (15, D(10, 20)), (30, D(50, 100))],
        spec=scaling(),
        start=1,
        max_replicas=8,
    )
    assert trace[1][1:] == (5, "ScaleUp")
    assert trace[2][1:] == (8, "Clamped")  # 100 / 4 = 25 > maxReplicas


def test_scale_up_waits_for_sustained_need() -> None:
    spec = scaling(scaleUpStabilizationSeconds=30)
    spike = run([(0, D(0, 4)), (10, D(0, 40)), (20, D(0, 4)), (30, D(0, 4))], spec=spec, start=1)
    assert replicas(spike) == [1, 1, 1, 1]  # a 10 s spike is not sustained
    assert spike[1][2] == "Stabilizing"
    sustained = run(
        [(t, D(0, 16)) for t in (0, 10, 20, 30, 40, 50)], spec=spec, start=1
    )  # need 4 replicas from t=0
    assert replicas(sustained) == [1, 1, 1, 4, 4, 4]  # up once the need outlived the window


def test_scale_down_only_to_the_highest_recommendation_in_the_window() -> None:
    spec = scaling(scaleDownStabilizationSeconds=60)
    samples = [(0, D(0, 32)), (15, D(0, 8)), (30, D(0, 12)), (45, D(0, 8)), (75, D(0, 8))]
    samples += [(90, D(0, 8)), (110, D(0, 4))]
    trace = run(samples, spec=spec, start=8)
    # the 8 from t=0 holds until it leaves the 60 s window; then the max of the window (3)
    assert replicas(trace) == [8, 8, 8, 8, 3, 2, 2]
    assert trace[4][2] == "ScaleDown"


def test_flapping_demand_does_not_flap_replicas() -> None:
    spec = scaling(scaleDownStabilizationSeconds=60)
    high, low = D(0, 16), D(0, 2)
    samples = [(t, high if i % 2 == 0 else low) for i, t in enumerate(range(0, 300, 10))]
    trace = run(samples, spec=spec, start=1)
    assert replicas(trace)[0] == 4
    assert set(replicas(trace)) == {4}  # up once, never down while demand keeps coming back


def test_idle_pool_scales_to_zero_after_idle_seconds() -> None:
    spec = scaling(idleSecondsToZero=120, scaleDownStabilizationSeconds=60)
    samples = [(0, D(1, 2))] + [(t, D(0, 0)) for t in range(15, 300, 15)]
    trace = run(samples, spec=spec, start=2, min_replicas=0)
    by_t = {t: (r, code) for t, r, code in trace}
    assert by_t[45] == (2, "Stabilizing")
    assert by_t[60] == (1, "ScaleDown")  # t=0 left the down window; keep one until idle
    assert all(by_t[t][0] == 1 for t in range(60, 120, 15))
    assert by_t[120] == (0, "ScaleToZero")  # 120 s after the last demand (t=0)
    assert all(by_t[t][0] == 0 for t in range(120, 300, 15))


def test_min_replicas_keeps_a_pool_warm() -> None:
    spec = scaling(idleSecondsToZero=30)
    trace = run([(t, D(0, 0)) for t in range(0, 600, 30)], spec=spec, start=1, min_replicas=1)
    assert set(replicas(trace)) == {1}


def test_cold_pool_stays_cold_without_demand_and_wakes_at_once() -> None:
    spec = scaling(scaleUpStabilizationSeconds=60)
    trace = run(
        [(0, D(0, 0)), (15, D(0, 0)), (30, D(0.5, 0)), (45, D(1, 12)), (95, D(1, 12))],
        spec=spec,
        start=0,
    )
    assert replicas(trace)[:2] == [0, 0]
    assert trace[2][1:] == (1, "Wake")  # demand counted for the cold tier: no window for the 1st
    assert trace[3][1] == 1  # more than one replica still needs a sustained need
    assert trace[4][1:] == (3, "ScaleUp")


def test_unreachable_routers_never_scale_down_or_to_zero() -> None:
    spec = scaling(idleSecondsToZero=30, scaleDownStabilizationSeconds=0)
    stale_zero = D(0, 0, stale=True)
    trace = run(
        [(0, D(0, 12)), *((t, stale_zero) for t in range(15, 300, 15))],
        spec=spec,
        start=3,
    )
    assert set(replicas(trace)) == {3}
    assert {code for _, _, code in trace[1:]} == {"StaleDemand"}
    up = run([(0, D(0, 4, stale=True)), (15, D(0, 40, stale=True))], spec=spec, start=1)
    assert replicas(up) == [1, 10]  # stale numbers may still scale up
    # the idle clock counts from the last stale observation, not from older real demand
    back = run(
        [(0, D(0, 0)), (25, stale_zero), (40, D(0, 0)), (50, D(0, 0)), (55, D(0, 0))],
        spec=spec,
        start=1,
    )
    assert replicas(back) == [1, 1, 1, 1, 0]


def test_unknown_demand_holds_and_clamps() -> None:
    spec = scaling()
    assert run([(0, None), (15, None)], spec=spec, start=2) == [
        (0, 2, "DemandUnknown"),
        (15, 2, "DemandUnknown"),
    ]
    assert run([(0, None)], spec=spec, start=7, max_replicas=5) == [(0, 5, "Clamped")]
    assert run([(0, None)], spec=spec, start=0, min_replicas=2) == [(0, 2, "Clamped")]


def test_restart_does_not_scale_down_before_the_window() -> None:
    spec = scaling(scaleDownStabilizationSeconds=60, idleSecondsToZero=600)
    trace = run([(1000, D(0, 0)), (1030, D(0, 0)), (1061, D(0, 0))], spec=spec, start=4)
    assert replicas(trace) == [4, 4, 1]


def test_requests_per_second_target() -> None:
    spec = scaling(targetRequestsPerSecondPerReplica=5)
    trace = run([(0, D(0.0, 0.0)), (15, D(22.0, 1.0))], spec=spec, start=1, min_replicas=1)
    assert trace[1][1:] == (5, "ScaleUp")


def test_wake_without_an_up_window_goes_straight_to_the_need() -> None:
    trace = run([(0, D(0, 0)), (15, D(2, 9))], spec=scaling(), start=0)
    assert trace == [(0, 0, "Stable"), (15, 3, "Wake")]
