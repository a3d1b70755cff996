"""Router decision overhead: features + sufficiency model + bandit, for a big JPEG and a prompt.

Measured in process on the router's own objects, for each learned policy: the edge's image
validation (one decode in JPEG draft mode, which also yields the features' preview) and the
policy's ``select`` (features, P(correct) per tier, bandit scores and propensity). Prompts are
either repeated (the prompt cache hits) or all distinct (every one misses). Part of
`foveal bench overhead`; `foveal bench overhead --decision-only` runs just this.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from foveal.bench.overhead import jpeg_data_uri
from foveal.config import LimitsSettings, PolicySettings, TierSettings
from foveal.pools.catalog import Catalog
from foveal.router.images import image_from_data_uri
from foveal.router.policies import DecisionContext, Reward, make_policy
from foveal.router.requests import ChatRequest, image_question
from foveal.router.tenant_policy import TenantPolicy

__all__ = ["DecisionTiming", "print_decision", "run_decision"]

POLICIES = ("model", "linucb", "lints")
PROMPTS = (
    "What is written on the sign?",
    "Is there a dog in this picture?",
    "How many people are there?",
    "What is the total on the receipt?",
    "What colour is the car?",
)


@dataclass
class DecisionTiming:
    what: str
    prompts: str  # repeated | distinct
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


def _stats(what: str, prompts: str, seconds: list[float]) -> DecisionTiming:
    ms = np.array(seconds) * 1000
    return DecisionTiming(
        what,
        prompts,
        len(ms),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        float(ms.mean()),
    )


def run_decision(*, requests: int = 1000, size: int = 1024) -> list[DecisionTiming]:
    """p50/p99 of validation and of each policy's select (+ update) for a size x size JPEG."""
    uri = jpeg_data_uri(size)
    limits = LimitsSettings()
    tiers = [
        TierSettings(name=f"t{k}", visual_tokens=k, cost_weight=k) for k in (1, 4, 16, 64, 256)
    ]
    catalog = Catalog.from_settings(tiers)
    tp = TenantPolicy(source="bench", quality_weight=0.05, quality_floor=0.5)
    out: list[DecisionTiming] = []
    validate: list[float] = []
    part = None
    for _ in range(max(20, requests // 10)):
        t0 = time.perf_counter()
        part = image_from_data_uri(uri, limits, param="image")
        validate.append(time.perf_counter() - t0)
    assert part is not None
    out.append(_stats(f"edge validation ({size}x{size} JPEG, draft decode)", "-", validate))

    def request(n: int, prompt: str) -> ChatRequest:
        return image_question(part, prompt, request_id=f"bench-{n}", tenant="bench")

    for name in POLICIES:
        for mode in ("repeated", "distinct"):
            policy = make_policy(PolicySettings(name=name))
            selects: list[float] = []
            updates: list[float] = []
            for n in range(requests + 50):
                prompt = PROMPTS[n % len(PROMPTS)]
                if mode == "distinct":
                    prompt = f"{prompt} (request {n})"
                ctx = DecisionContext(request=request(n, prompt), catalog=catalog, tenant_policy=tp)
                t0 = time.perf_counter()
                d = policy.select(ctx)
                t1 = time.perf_counter()
                features: dict[str, Any] = {**d.features, "tenant_policy": tp.summary()}
                policy.update(Reward(f"bench-{n}", "bench", d.tier, float(n % 2), features))
                t2 = time.perf_counter()
                if n >= 50:  # warm-up: caches, first allocations
                    selects.append(t1 - t0)
                    updates.append(t2 - t1)
            out.append(_stats(f"{name}: select (features + model + bandit)", mode, selects))
            if name != "model":
                out.append(_stats(f"{name}: update", mode, updates))
            close = getattr(policy, "close", None)
            if callable(close):
                close()
    return out


def print_decision(rows: list[DecisionTiming], console: Console) -> None:
    table = Table(title="Router decision overhead (in process, one thread)")
    for col in ("what", "prompts", "n", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="left" if col in ("what", "prompts") else "right")
    for r in rows:
        table.add_row(
            r.what, r.prompts, str(r.n), f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.mean_ms:.3f}"
        )
    console.print(table)


def as_json(rows: list[DecisionTiming]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
