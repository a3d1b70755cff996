"""`foveal bench routing` end to end: real reference pools, a real router per strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from foveal.bench.routing import run_routing
from foveal.bench.routing_stack import TIERS

pytestmark = pytest.mark.timeout(600)


def test_routing_benchmark_small_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_routing(
        out,
        per_family=1,
        only=["foveal-model", "foveal-linucb-online"],
        shift_events=20,
        console=Console(file=open("/dev/null", "w")),  # noqa: SIM115
    )
    assert (out / "routing.png").stat().st_size > 0
    assert (out / "shift.png").stat().st_size > 0
    saved = json.loads((out / "routing.json").read_text())
    assert saved["samples"] == result["samples"] == 7
    by = {r["name"]: r for r in saved["strategies"]}
    assert set(by) >= {*(f"fixed {t}" for t in TIERS), "random", "oracle", "foveal-model"}
    assert "foveal-linucb-online" in by
    assert by["fixed t256"]["cost_flops"] == pytest.approx(1.0)
    assert by["fixed t1"]["share"]["t1"] == 1.0
    for r in by.values():
        assert sum(r["share"].values()) == pytest.approx(1.0)
        assert r["accuracy"] <= by["oracle"]["accuracy"] + 1e-9
    # the pools answer greedily: a routed request's answer matches the pinned pass at its tier
    assert by["foveal-model"]["extra"]["agrees_with_pinned"] == 1.0
    # cost really scales with the tier (FLOPs are exact; engine time is measured)
    assert by["fixed t1"]["cost_flops"] < by["fixed t64"]["cost_flops"] < 1.0
    assert by["fixed t1"]["cost_engine_s"] < 1.0
    assert saved["shift"]["events_per_phase"] == 20
    assert set(saved["shift"]["policies"]) == {"linucb", "lints", "model"}
