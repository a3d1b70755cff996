"""`foveal bench tiers` end to end: the shipped checkpoint, real pool servers per tier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from foveal.bench.tiers import TIERS, run_tiers
from foveal.cli import app


def test_bench_tiers_measures_every_tier_on_real_pools_with_the_asked_threads(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "tiers", "--out", str(tmp_path), "--per-family", "1", "--requests", "4"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "tiers.json").read_text())
    assert (tmp_path / "tiers.png").stat().st_size > 0
    assert out["machine"]["torch_threads"] == 1  # the default, as the local stack runs pools
    tiers = [f"t{k}" for k in TIERS]
    assert list(out["speed"]) == tiers
    for speed in out["speed"].values():
        assert speed["rps_c1"] > 0 and speed["rps_c16"] > 0 and speed["ms_per_request_c1"] > 0
    flops = [out["prefill_flops"]["resolution"][t] for t in tiers]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    assert out["samples"] == 7 and set(out["accuracy"]["resolution"]["overall"]) == set(tiers)
    assert "t1 vs t256" in result.output


def test_bench_tiers_rejects_a_thread_count_below_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        run_tiers(tmp_path, per_family=1, requests=0, threads=0)
    result = CliRunner().invoke(app, ["bench", "tiers", "--out", str(tmp_path), "--threads", "0"])
    assert result.exit_code != 0 and "--threads" in result.output
    assert not (tmp_path / "tiers.json").exists()  # nothing written on bad input
