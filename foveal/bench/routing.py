"""`foveal bench routing`: accuracy and cost of routing strategies on real pools and a real router.

On the suite's held-out split (or any dataset in the suite's format), served by one reference
pool per tier (`foveal pool serve`) through a real router (`foveal router serve`, one per
strategy, each on a fresh SQLite store):

- **fixed tiers**: every request pinned to one tier (this pass is also the per-request table the
  table-derived strategies read: the pools answer greedily, so a request's answer at a tier is
  the same whenever it is asked);
- **random** (uniform tier per request) and the **oracle** (the cheapest tier that answers
  correctly; the cheapest tier when none does) — derived from that table;
- **rules**, **Foveal (model)**, **text-only** and **image-only** sufficiency models, **cascade**,
  and the **bandits online** (LinUCB and linear Thompson sampling, feedback = ground truth sent
  to the router's feedback endpoint after every answer) — each served by its own router.

Cost is counted twice: measured pool-seconds (what the router recorded per request, all
attempts) and prefill FLOPs per request (from the model's shapes), both relative to the top
tier. The workload-shift run lives in :mod:`foveal.bench.routing_shift`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from foveal.bench.routing_stack import (
    TIERS,
    Answer,
    engine_seconds,
    image_data_uri,
    reference_pools,
    router_config,
    router_server,
    run_requests,
)
from foveal.bench.tiers import load_samples
from foveal.pools.reference.checkpoint import SHIPPED, load_checkpoint

__all__ = ["Outcome", "StrategyResult", "run_routing", "summarise"]

TOP = TIERS[-1]


@dataclass
class Outcome:
    """What one strategy did with one request."""

    index: int
    tier: str  # answering tier (the last attempt's)
    correct: bool
    pool_s: float  # pool wall-seconds the router measured (all attempts)
    flops: float  # prefill FLOPs (all attempts)
    attempts: tuple[str, ...] = ()  # tiers asked, in order (cascade: two)


@dataclass
class StrategyResult:
    name: str
    source: str  # served | table (derived from the pinned pass)
    n: int
    accuracy: float
    pct_of_top: float  # accuracy / top tier's accuracy
    cost_pool_s: float  # relative to the top tier (pool wall-seconds the router measured)
    cost_engine_s: float  # relative to the top tier (pools' engine busy seconds per request)
    cost_flops: float  # relative to the top tier (prefill FLOPs)
    share: dict[str, float]  # fraction of requests answered per tier
    gap_closed: float | None  # (acc - best fixed) / (oracle - best fixed)
    pool_seconds: float  # absolute, summed
    extra: dict[str, Any] = field(default_factory=dict)
    cost_tokens: float = 0.0  # mean visual tokens per request / the top tier's (the policy's cost)
    utility: float = 0.0  # accuracy - λ·cost_tokens: what the policy maximises
    gap_closed_utility: float | None = None  # the gap of the utility (best fixed by utility)


def summarise(
    name: str,
    source: str,
    outcomes: Sequence[Outcome],
    top: Sequence[Outcome],
    best_fixed_acc: float,
    oracle_acc: float,
    engine_s: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> StrategyResult:
    """`engine_s`: the pools' mean engine seconds per request of each tier (pinned passes)."""
    n = len(outcomes)
    acc = sum(o.correct for o in outcomes) / n
    top_acc = sum(o.correct for o in top) / len(top)
    top_s = sum(o.pool_s for o in top)
    top_f = sum(o.flops for o in top)
    counts = Counter(o.tier for o in outcomes)
    gap = oracle_acc - best_fixed_acc
    return StrategyResult(
        name=name,
        source=source,
        n=n,
        accuracy=acc,
        pct_of_top=acc / top_acc if top_acc else float("nan"),
        cost_pool_s=sum(o.pool_s for o in outcomes) / top_s,
        cost_engine_s=sum(engine_s[t] for o in outcomes for t in o.attempts)
        / (len(top) * engine_s[TOP]),
        cost_flops=sum(o.flops for o in outcomes) / top_f,
        share={t: counts.get(t, 0) / n for t in TIERS},
        gap_closed=(acc - best_fixed_acc) / gap if gap > 1e-9 else None,
        pool_seconds=sum(o.pool_s for o in outcomes),
        extra=extra or {},
    )


@dataclass
class Strategy:
    """A strategy served by its own router: policy settings, tenant policy, feedback or not."""

    name: str
    policy: dict[str, Any]
    tenant_policy: dict[str, Any] = field(default_factory=dict)
    feedback: bool = False


def served_strategies(
    quality_weight: float,
    quality_floor: float,
    cascade_threshold: float,
    artifacts: dict[str, Path],
) -> list[Strategy]:
    tp = {"quality_weight": quality_weight, "quality_floor": quality_floor}
    out = [Strategy("rules", {"name": "rules"}, tp)]
    out.append(Strategy("foveal-model", {"name": "model"}, tp))
    for kind in ("text-only", "image-only"):
        if kind in artifacts:
            out.append(
                Strategy(f"{kind}-model", {"name": "model", "model_path": str(artifacts[kind])}, tp)
            )
    out.append(
        Strategy(
            "foveal-cascade", {"name": "model"}, {**tp, "cascade": {"threshold": cascade_threshold}}
        )
    )
    out.append(Strategy("foveal-linucb-online", {"name": "linucb"}, tp, feedback=True))
    out.append(Strategy("foveal-lints-online", {"name": "lints"}, tp, feedback=True))
    return out


def _outcomes(answers: Sequence[Answer], flops: dict[str, float]) -> list[Outcome]:
    out = []
    for a in answers:
        casc = a.features.get("cascade") if isinstance(a.features, dict) else None
        attempts: tuple[str, ...] = (a.tier,)
        if isinstance(casc, dict) and casc.get("escalated_to"):
            attempts = (str(casc.get("first_tier")), str(casc["escalated_to"]))
        out.append(
            Outcome(
                index=a.index,
                tier=a.tier,
                correct=a.correct,
                pool_s=a.pool_s,
                flops=sum(flops[t] for t in attempts if t in flops),
                attempts=attempts,
            )
        )
    return out


def oracle_tier(row: dict[str, Outcome]) -> str:
    """The cheapest tier that answers correctly (the cheapest tier when none does)."""
    return next((t for t in TIERS if row[t].correct), TIERS[0])


def run_routing(
    out: Path,
    *,
    dataset: Path | None = None,
    per_family: int = 50,
    checkpoint: Path | None = None,
    quality_weight: float = 0.05,
    quality_floor: float = 0.0,
    cascade_threshold: float = 0.5,
    artifacts: dict[str, Path] | None = None,
    only: Sequence[str] | None = None,
    shift_events: int = 5000,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console()
    checkpoint = checkpoint or SHIPPED
    model = load_checkpoint(checkpoint)
    flops = {t: float(model.prefill_flops(int(t[1:]))) for t in TIERS}
    del model
    samples = load_samples(dataset, per_family)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)  # families interleaved (the bandits learn online)
    items = [
        (i, image_data_uri(samples[i].image), samples[i].question, samples[i].answer) for i in order
    ]
    strategies = served_strategies(
        quality_weight, quality_floor, cascade_threshold, artifacts or {}
    )
    if only:
        strategies = [s for s in strategies if s.name in only]
    console.print(
        f"{len(samples)} requests x ({len(TIERS)} pinned tiers + {len(strategies)} routed "
        f"strategies); {os.cpu_count()} CPUs; λ={quality_weight}, floor={quality_floor}"
    )
    t_start = time.perf_counter()
    served: dict[str, list[Answer]] = {}
    engine: dict[str, dict[str, float]] = {}  # run -> tier -> engine seconds spent in it
    with (
        tempfile.TemporaryDirectory(prefix="foveal-routing-") as tmp,
        reference_pools(checkpoint) as urls,
        Progress(console=console, transient=True) as progress,
    ):
        work = Path(tmp)
        tp = {"quality_weight": quality_weight, "quality_floor": quality_floor}
        runs: list[tuple[str, dict[str, Any], dict[str, Any], bool, str]] = [
            ("pinned", {"name": "rules"}, tp, False, t) for t in TIERS
        ]
        runs += [(s.name, s.policy, s.tenant_policy, s.feedback, "auto") for s in strategies]
        for name, policy, tenant_policy, feedback, model_name in runs:
            label = name if model_name == "auto" else f"pinned {model_name}"
            store = f"sqlite:///{work}/{label.replace(' ', '-')}.db"
            config = router_config(urls, store, policy=policy, tenant_policy=tenant_policy)
            task = progress.add_task(label, total=len(items))
            with router_server(config, work) as url:
                # warm-up (not counted): connections, first forward passes, caches
                run_requests(url, items[:3], model=model_name if model_name != "auto" else TOP)
                before = engine_seconds(urls)
                answers = run_requests(
                    url,
                    items,
                    model=model_name,
                    feedback=feedback,
                    progress=lambda task=task: progress.advance(task),
                )
            after = engine_seconds(urls)
            engine[label] = {t: after[t] - before[t] for t in TIERS}
            served[label] = answers
            progress.remove_task(task)
            acc = sum(a.correct for a in answers) / len(answers)
            console.print(f"  {label:24s} accuracy {acc:6.1%}")
    result = assemble(served, engine, flops, samples, seed=seed, quality_weight=quality_weight)
    if shift_events:
        console.print(f"workload shift: 2 x {shift_events} feedback events (replayed answers)")
        result["shift"] = shift_run(served, samples, quality_weight, shift_events, seed)
    result.update(
        {
            "dataset": str(dataset) if dataset else "suite test split",
            "samples": len(samples),
            "quality_weight": quality_weight,
            "quality_floor": quality_floor,
            "cascade_threshold": cascade_threshold,
            "prefill_flops": flops,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "machine": {"cpus": os.cpu_count()},
        }
    )
    write_results(result, out, console)
    return result


def assemble(
    served: dict[str, list[Answer]],
    engine: dict[str, dict[str, float]],
    flops: dict[str, float],
    samples: Sequence[Any],
    *,
    seed: int = 0,
    quality_weight: float = 0.0,
) -> dict[str, Any]:
    """Strategy results from the served answers (pinned passes + routed strategies)."""
    table: dict[int, dict[str, Outcome]] = {}
    for t in TIERS:
        for o in _outcomes(served[f"pinned {t}"], flops):
            table.setdefault(o.index, {})[t] = o
    indices = sorted(table)
    fixed = {t: [table[i][t] for i in indices] for t in TIERS}
    fixed_acc = {t: sum(o.correct for o in fixed[t]) / len(indices) for t in TIERS}
    best_fixed = max(TIERS, key=lambda t: (fixed_acc[t], -TIERS.index(t)))
    rng = random.Random(seed + 1)
    derived: dict[str, list[Outcome]] = {
        "random": [table[i][rng.choice(TIERS)] for i in indices],
        "oracle": [table[i][oracle_tier(table[i])] for i in indices],
    }
    oracle_acc = sum(o.correct for o in derived["oracle"]) / len(indices)
    top = fixed[TOP]
    # mean engine seconds per request of each tier, from its pinned pass
    per_request = {t: engine[f"pinned {t}"][t] / len(indices) for t in TIERS}

    def res(name: str, source: str, outs: Sequence[Outcome], **extra: Any) -> StrategyResult:
        return summarise(
            name, source, outs, top, fixed_acc[best_fixed], oracle_acc, per_request, extra
        )

    results = [res(f"fixed {t}", "served", fixed[t]) for t in TIERS]
    results.append(res("random", "table", derived["random"]))
    for name, answers in served.items():
        if name.startswith("pinned "):
            continue
        outs = _outcomes(answers, flops)
        agree = sum(o.correct == table[o.index][o.tier].correct for o in outs) / len(outs)
        spent = sum(engine[name].values()) / engine[f"pinned {TOP}"][TOP]
        results.append(
            res(
                name,
                "served",
                outs,
                agrees_with_pinned=round(agree, 4),
                engine_s_scraped_relative=round(spent, 4),
            )
        )
    results.append(res("oracle", "table", derived["oracle"]))
    outcomes_of = {r.name: _outs_of(r.name, served, table, derived, flops) for r in results}
    top_tokens = int(TOP[1:])
    for r in results:
        outs = outcomes_of[r.name]
        r.cost_tokens = sum(int(t[1:]) for o in outs for t in o.attempts) / (len(outs) * top_tokens)
        r.utility = r.accuracy - quality_weight * r.cost_tokens
    fixed_u = max(r.utility for r in results if r.name.startswith("fixed "))
    oracle_u = next(r.utility for r in results if r.name == "oracle")
    for r in results:
        gap_u = oracle_u - fixed_u
        r.gap_closed_utility = (r.utility - fixed_u) / gap_u if gap_u > 1e-9 else None
    families = sorted({getattr(s, "family", "?") for s in samples})
    per_family = {r.name: _per_family(r.name, served, table, samples, derived) for r in results}
    return {
        "strategies": [asdict(r) for r in results],
        "best_fixed_tier": best_fixed,
        "oracle_accuracy": oracle_acc,
        "families": families,
        "per_family_accuracy": per_family,
        "targets": targets(results),
        "engine_s_per_request": per_request,
    }


def _outs_of(
    name: str,
    served: dict[str, list[Answer]],
    table: dict[int, dict[str, Outcome]],
    derived: dict[str, list[Outcome]],
    flops: dict[str, float],
) -> list[Outcome]:
    if name.startswith("fixed "):
        return [table[i][name.split()[1]] for i in sorted(table)]
    if name in derived:
        return derived[name]
    return _outcomes(served[name], flops)


def _per_family(
    name: str,
    served: dict[str, list[Answer]],
    table: dict[int, dict[str, Outcome]],
    samples: Sequence[Any],
    derived: dict[str, list[Outcome]],
) -> dict[str, float]:
    if name.startswith("fixed "):
        rows = [(i, table[i][name.split()[1]].correct) for i in table]
    elif name in derived:
        rows = [(o.index, o.correct) for o in derived[name]]
    else:
        rows = [(a.index, a.correct) for a in served[name]]
    acc: dict[str, list[bool]] = {}
    for i, ok in rows:
        acc.setdefault(getattr(samples[i], "family", "?"), []).append(ok)
    return {f: round(sum(v) / len(v), 4) for f, v in sorted(acc.items())}


def targets(results: Sequence[StrategyResult]) -> dict[str, Any]:
    """The issue's targets for Foveal (model): ≥ 97% of top accuracy at ≤ 30% cost; ≥ 60% gap."""
    by = {r.name: r for r in results}
    out: dict[str, Any] = {}
    for name in ("foveal-model", "foveal-cascade", "foveal-linucb-online", "foveal-lints-online"):
        r = by.get(name)
        if r is None:
            continue
        out[name] = {
            "pct_of_top": round(r.pct_of_top, 4),
            "cost_pool_s": round(r.cost_pool_s, 4),
            "cost_engine_s": round(r.cost_engine_s, 4),
            "cost_flops": round(r.cost_flops, 4),
            "gap_closed": None if r.gap_closed is None else round(r.gap_closed, 4),
            "gap_closed_utility": (
                None if r.gap_closed_utility is None else round(r.gap_closed_utility, 4)
            ),
            "meets_97pct_at_30pct_engine_s": r.pct_of_top >= 0.97 and r.cost_engine_s <= 0.30,
            "meets_97pct_at_30pct_flops": r.pct_of_top >= 0.97 and r.cost_flops <= 0.30,
            "meets_97pct_at_30pct_pool_wall_s": r.pct_of_top >= 0.97 and r.cost_pool_s <= 0.30,
            "meets_60pct_gap_accuracy": r.gap_closed is not None and r.gap_closed >= 0.60,
            "meets_60pct_gap_utility": (
                r.gap_closed_utility is not None and r.gap_closed_utility >= 0.60
            ),
        }
    return out


def shift_run(
    served: dict[str, list[Answer]],
    samples: Sequence[Any],
    quality_weight: float,
    events: int,
    seed: int,
) -> dict[str, Any]:
    """The workload-shift replay over the pinned pass's answers (see routing_shift)."""
    from foveal.bench.routing_shift import run_shift

    correct: dict[int, dict[str, bool]] = {}
    for t in TIERS:
        for a in served[f"pinned {t}"]:
            correct.setdefault(a.index, {})[t] = a.correct
    rows = [
        (getattr(samples[i], "family", "?"), image_data_uri(samples[i].image), samples[i].question)
        for i in range(len(samples))
    ]
    return asdict(
        run_shift(
            correct=correct,
            samples=rows,
            quality_weight=quality_weight,
            events_per_phase=events,
            seed=seed,
        )
    )


def write_results(result: dict[str, Any], out: Path, console: Console) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_routing(result, out / "routing.png")
    print_routing(result, console)
    if "shift" in result:
        from foveal.bench.routing_shift import plot_shift_json, print_shift

        plot_shift_json(result["shift"], out / "shift.png")
        print_shift(result["shift"], console)
    console.print(f"wrote {out / 'routing.json'}, {out / 'routing.png'}")


def print_routing(result: dict[str, Any], console: Console) -> None:
    table = Table(title="Routing strategies (relative cost: top tier = 1.00)")
    for col in ("strategy", "acc %", "% of top", "pool wall-s", "engine-s", "FLOPs"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for t in TIERS:
        table.add_column(t, justify="right")
    table.add_column("gap closed (acc)", justify="right")
    table.add_column("utility", justify="right")
    table.add_column("gap closed (utility)", justify="right")
    for r in result["strategies"]:
        gap = r["gap_closed"]
        table.add_row(
            r["name"],
            f"{100 * r['accuracy']:.1f}",
            f"{100 * r['pct_of_top']:.1f}",
            f"{r['cost_pool_s']:.2f}",
            f"{r['cost_engine_s']:.3f}",
            f"{r['cost_flops']:.3f}",
            *(f"{100 * r['share'][t]:.0f}" for t in TIERS),
            "-" if gap is None else f"{100 * gap:.0f}%",
            f"{r['utility']:.3f}",
            "-" if r["gap_closed_utility"] is None else f"{100 * r['gap_closed_utility']:.0f}%",
        )
    console.print(table)


def plot_routing(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, key, label in (
        (axes[0], "cost_pool_s", "relative cost (pool wall-seconds, router-measured)"),
        (axes[1], "cost_engine_s", "relative cost (pool engine-seconds)"),
        (axes[2], "cost_flops", "relative cost (prefill FLOPs)"),
    ):
        fixed = [r for r in result["strategies"] if r["name"].startswith("fixed ")]
        ax.plot(
            [r[key] for r in fixed],
            [100 * r["accuracy"] for r in fixed],
            "o-",
            color="grey",
            label="fixed tiers",
        )
        for r in fixed:
            ax.annotate(r["name"].split()[1], (r[key], 100 * r["accuracy"]), fontsize=8)
        for r in result["strategies"]:
            if r["name"].startswith("fixed "):
                continue
            marker = "*" if r["name"].startswith("foveal") else "s"
            ax.plot(r[key], 100 * r["accuracy"], marker, markersize=9, label=r["name"])
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("exact match (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")  # the empty corner: costly and poor
    fig.suptitle(f"Routing on {result['samples']} requests ({result['dataset']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
