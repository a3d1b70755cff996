"""The workload-shift run of `foveal bench routing`: do the bandits keep up when the mix changes?

A stream of feedback events whose family mix changes half way (general questions first —
colour, existence, counting, position — then reading: OCR, documents, charts), drawn with
replacement from the benchmark's held-out requests. For each event the router's own policy
object (LinUCB, linear Thompson sampling, or the static sufficiency model) selects a tier on
the real request (features extracted by the router's code from the request's image and
prompt), and learns from the reward ``score − λ·cost`` where the score is whether that tier's
pool answered the request correctly. Those answers come from the pinned pass of the routing
benchmark (the reference pools answer greedily, so a request's answer at a tier does not change
between asks): the run replays served answers at thousands of events per second instead of
re-serving them, and says so in its output.

Reported: reward over time (moving average) per policy, the best fixed tier of each phase,
the per-request oracle, cumulative regret against the oracle, and after how many post-shift
feedback events each bandit's reward beats the best fixed tier's.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from foveal.bench.routing_stack import TIERS
from foveal.config import LimitsSettings, PolicySettings, TierSettings
from foveal.pools.catalog import Catalog
from foveal.router.images import image_from_bytes
from foveal.router.policies import DecisionContext, Policy, Reward, make_policy
from foveal.router.requests import ChatRequest, image_question
from foveal.router.tenant_policy import TenantPolicy

__all__ = ["PHASES", "ShiftResult", "run_shift"]

#: family mix of each phase (uniform over the listed families)
PHASES: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("colour", "existence", "counting", "position"),
    ("ocr", "document", "chart"),
)
POLICIES = ("linucb", "lints", "model")
WINDOW = 500


@dataclass
class ShiftResult:
    events_per_phase: int
    quality_weight: float
    policies: dict[str, dict[str, Any]]
    fixed: dict[str, dict[str, float]]  # phase -> tier -> mean reward
    oracle: dict[str, float]  # phase -> mean reward
    best_fixed: dict[str, str]  # phase -> tier
    curves: dict[str, list[float]]  # moving-average reward per event, per policy (+ refs)


def _request(image_uri: str, question: str, n: int) -> ChatRequest:
    data = base64.b64decode(image_uri.split(",", 1)[1])
    part = image_from_bytes(data, LimitsSettings(), param="image")
    return image_question(part, question, request_id=f"shift-{n}", tenant="bench")


def _stream(families: Sequence[str], events_per_phase: int, seed: int) -> list[tuple[int, int]]:
    """(phase, sample index) per event."""
    rng = random.Random(seed)
    by_family: dict[str, list[int]] = {}
    for i, f in enumerate(families):
        by_family.setdefault(f, []).append(i)
    out = []
    for phase, fams in enumerate(PHASES):
        pool = [f for f in fams if f in by_family]
        if not pool:
            raise ValueError(f"the dataset has none of the phase-{phase + 1} families {fams}")
        for _ in range(events_per_phase):
            out.append((phase, rng.choice(by_family[rng.choice(pool)])))
    return out


def run_shift(
    *,
    correct: dict[int, dict[str, bool]],
    samples: Sequence[tuple[str, str, str]],  # (family, image data URI, question) by index
    quality_weight: float,
    events_per_phase: int = 5000,
    seed: int = 0,
    policy_settings: dict[str, dict[str, Any]] | None = None,
) -> ShiftResult:
    """Replay a shifting stream through each policy; `correct[i][tier]` from the pinned pass."""
    tiers = [TierSettings(name=t, visual_tokens=int(t[1:]), cost_weight=int(t[1:])) for t in TIERS]
    catalog = Catalog.from_settings(tiers)
    cost = {t: int(t[1:]) / int(TIERS[-1][1:]) for t in TIERS}
    tp = TenantPolicy(source="bench", quality_weight=quality_weight)
    stream = _stream([s[0] for s in samples], events_per_phase, seed)
    requests = {i: _request(samples[i][1], samples[i][2], i) for i in {i for _, i in stream}}

    def reward(i: int, tier: str) -> float:
        return float(correct[i][tier]) - quality_weight * cost[tier]

    phase_names = ("before", "after")
    fixed = {
        phase_names[p]: {
            t: float(np.mean([reward(i, t) for q, i in stream if q == p])) for t in TIERS
        }
        for p in range(2)
    }
    oracle_r = [max(reward(i, t) for t in TIERS) for _, i in stream]
    phase_of = np.array([q for q, _ in stream])
    oracle = {phase_names[p]: float(np.mean(np.array(oracle_r)[phase_of == p])) for p in range(2)}
    best_fixed = {p: max(v, key=lambda t: v[t]) for p, v in fixed.items()}
    curves: dict[str, list[float]] = {"oracle": _moving(oracle_r)}
    for name in phase_names:
        bf = best_fixed[name]
        curves[f"fixed {bf} (best {name})"] = _moving([reward(i, bf) for _, i in stream])
    policies: dict[str, dict[str, Any]] = {}
    for name in POLICIES:
        settings = PolicySettings(name=name, **(policy_settings or {}).get(name, {}))
        policy = make_policy(settings)
        rewards = _replay(policy, stream, requests, catalog, tp, reward, correct)
        curves[name] = _moving(rewards)
        after = rewards[events_per_phase:]
        policies[name] = {
            "mean_reward_before": float(np.mean(rewards[:events_per_phase])),
            "mean_reward_after": float(np.mean(after)),
            "regret_vs_oracle": float(np.sum(np.array(oracle_r) - np.array(rewards))),
            "events_to_beat_best_fixed_after_shift": _crossing(
                after, [reward(i, best_fixed["after"]) for _, i in stream[events_per_phase:]]
            ),
        }
    return ShiftResult(
        events_per_phase=events_per_phase,
        quality_weight=quality_weight,
        policies=policies,
        fixed=fixed,
        oracle=oracle,
        best_fixed=best_fixed,
        curves=curves,
    )


def _replay(
    policy: Policy,
    stream: Sequence[tuple[int, int]],
    requests: dict[int, ChatRequest],
    catalog: Catalog,
    tp: TenantPolicy,
    reward: Any,
    correct: dict[int, dict[str, bool]],
) -> list[float]:
    out = []
    for n, (_, i) in enumerate(stream):
        req = requests[i]
        d = policy.select(DecisionContext(request=req, catalog=catalog, tenant_policy=tp))
        out.append(reward(i, d.tier))
        features = {**d.features, "tenant_policy": tp.summary()}
        score = 1.0 if correct[i][d.tier] else 0.0
        policy.update(Reward(f"shift-{n}", "bench", d.tier, score, features))
    return out


def _moving(values: Sequence[float], window: int = WINDOW) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    lo = np.maximum(0, np.arange(1, len(v) + 1) - window)
    avg = (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)
    return [round(float(x), 4) for x in avg]


def _crossing(policy: Sequence[float], fixed: Sequence[float]) -> int | None:
    """First post-shift event after which the policy's cumulative reward stays ahead of the
    best fixed tier's (None: never within the run)."""
    diff = np.cumsum(np.asarray(policy) - np.asarray(fixed))
    behind = np.nonzero(diff <= 0)[0]
    if len(behind) == 0:
        return 1
    last = int(behind[-1])
    return None if last == len(diff) - 1 else last + 2


def print_shift(shift: dict[str, Any], console: Console) -> None:
    n = shift["events_per_phase"]
    table = Table(title=f"Workload shift: {n} events per phase (general -> reading), replayed")
    for col in ("policy", "reward before", "reward after", "regret vs oracle", "events to beat"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for name, p in shift["policies"].items():
        beat = p["events_to_beat_best_fixed_after_shift"]
        table.add_row(
            name,
            f"{p['mean_reward_before']:.3f}",
            f"{p['mean_reward_after']:.3f}",
            f"{p['regret_vs_oracle']:.0f}",
            "never" if beat is None else str(beat),
        )
    for phase, tier in shift["best_fixed"].items():
        table.add_row(
            f"best fixed {phase}: {tier}",
            f"{shift['fixed']['before'][tier]:.3f}",
            f"{shift['fixed']['after'][tier]:.3f}",
            "",
            "",
        )
    table.add_row(
        "oracle", f"{shift['oracle']['before']:.3f}", f"{shift['oracle']['after']:.3f}", "0", ""
    )
    console.print(table)


def plot_shift_json(shift: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, lam = shift["events_per_phase"], shift["quality_weight"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for name, curve in shift["curves"].items():
        style = "--" if name.startswith(("fixed", "oracle")) else "-"
        ax.plot(curve, style, label=name, linewidth=1.2)
    ax.axvline(n, color="black", linewidth=0.8)
    ax.text(n, ax.get_ylim()[1], " shift", va="top")
    ax.set_xlabel("feedback event")
    ax.set_ylabel(f"reward, moving average of {WINDOW}: correct - {lam} x cost")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
