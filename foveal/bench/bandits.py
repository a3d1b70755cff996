"""Microbenchmark of the bandits: one update and one select, in microseconds.

``python -m foveal.bench.bandits [--dim D] [--arms K] [--repeat N] [--json]`` times, on one
thread, the pure functions (``LinearBandit.update``: Sherman–Morrison, O(d²); ``select``:
estimates, the choice and its exact propensity) and the policy's ``update`` as the router
calls it (context rebuilt from the decision record's JSON list, score clipped, state updated;
no store write: those happen on a worker thread). Each figure is the median over 7 runs of
the mean over ``repeat`` calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from foveal.config import PolicySettings
from foveal.router.bandit_policy import BanditPolicy
from foveal.router.bandits import LinearBandit, LinTS, LinUCB, prob_max
from foveal.router.features import CONTEXT_DIM
from foveal.router.policies import Reward

__all__ = ["run_bandit_bench"]


def _time_us(fn: Callable[[int], object], repeat: int, runs: int = 7) -> float:
    fn(0)  # warm up
    means = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        for i in range(repeat):
            fn(i)
        means.append((time.perf_counter_ns() - t0) / repeat / 1000)
    return statistics.median(means)


def _trained(bandit: LinearBandit, arms: list[str], xs: np.ndarray) -> LinearBandit:
    for i, x in enumerate(xs[:200]):
        bandit.update(arms[i % len(arms)], x, 0.5)
    return bandit


def run_bandit_bench(dim: int = CONTEXT_DIM, arms: int = 5, repeat: int = 2000) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    names = [f"t{4**k}" for k in range(arms)]
    xs = np.hstack([rng.uniform(-1, 1, (repeat + 200, dim - 1)), np.ones((repeat + 200, 1))])
    base = {n: 0.5 - 0.1 * k for k, n in enumerate(names)}
    results: dict[str, float] = {}
    for cls in (LinUCB, LinTS):
        bandit = _trained(cls(dim), names, xs)
        choose = np.random.default_rng(1)

        def update(i: int, b: LinearBandit = bandit) -> None:
            b.update(names[i % arms], xs[i], 0.7)

        def select(i: int, b: LinearBandit = bandit, r: np.random.Generator = choose) -> None:
            b.select(xs[i], names, base=base, rng=r)

        results[f"{cls.algorithm}.update_us"] = _time_us(update, repeat)
        results[f"{cls.algorithm}.select_us"] = _time_us(select, repeat)
    means, sds = rng.uniform(0, 1, arms), rng.uniform(0.05, 0.3, arms)
    results["prob_max_us"] = _time_us(lambda i: prob_max(means, sds), repeat)
    if dim == CONTEXT_DIM:  # the policy's contexts have the features' dimension
        results["policy.update_us"] = _policy_update_us(names, xs, repeat)
    return {
        "dim": dim,
        "arms": arms,
        "repeat": repeat,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "results_us": {k: round(v, 2) for k, v in results.items()},
    }


def _policy_update_us(names: list[str], xs: np.ndarray, repeat: int) -> float:
    policy = BanditPolicy(PolicySettings(), "lints", model=None)
    rewards = [
        Reward(
            f"r{i}",
            "acme",
            names[i % len(names)],
            0.8,
            {"context": np.round(xs[i], 4).tolist(), "prior": dict.fromkeys(names, 0.5)},
        )
        for i in range(repeat)
    ]
    return _time_us(lambda i: policy.update(rewards[i]), repeat)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=CONTEXT_DIM)
    parser.add_argument("--arms", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = run_bandit_bench(args.dim, args.arms, args.repeat)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"d={out['dim']} K={out['arms']} ({out['repeat']} calls x 7 runs, median of means)")
    for name, us in out["results_us"].items():
        print(f"  {name:<20} {us:8.2f} µs")


if __name__ == "__main__":
    main()
