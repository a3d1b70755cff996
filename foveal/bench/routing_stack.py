"""The routing benchmark's moving parts: reference pools, a router per strategy, a client.

Everything is real and on loopback: one `foveal pool serve` subprocess per tier (the reference
VLM), and for each strategy a `foveal router serve` subprocess configured with that strategy's
policy, on a fresh SQLite store. The client talks to the router's OpenAI-compatible gateway,
reads the decision record back (`GET /v1/decisions/{id}`: the pool-seconds the router measured,
the chosen tier, the propensity) and, for learning strategies, sends feedback with the request's
single-use token.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from foveal.bench.suite.dataset import answers_match, image_data_uri
from foveal.bench.tiers import _free_port, foveal_subprocess, pool_server

__all__ = ["Answer", "RouterClient", "image_data_uri", "reference_pools", "router_server"]

TIERS: tuple[str, ...] = ("t1", "t4", "t16", "t64", "t256")


@contextmanager
def reference_pools(checkpoint: Path, threads: int = 1) -> Iterator[dict[str, str]]:
    """One reference pool server per tier; yields tier -> base URL."""
    with ExitStack() as stack:
        urls = {t: stack.enter_context(pool_server(t, checkpoint, threads=threads)) for t in TIERS}
        yield urls


def router_config(
    urls: dict[str, str],
    store_url: str,
    *,
    policy: dict[str, Any],
    tenant_policy: dict[str, Any],
) -> dict[str, Any]:
    return {
        "gateway": {"host": "127.0.0.1", "port": _free_port()},
        "grpc": {"host": "127.0.0.1", "port": _free_port()},
        "store": {"url": store_url},
        "log_level": "WARNING",
        "policy": policy,
        "tenant_policy": tenant_policy,
        "tiers": [
            {
                "name": t,
                "visual_tokens": int(t[1:]),
                "cost_weight": int(t[1:]),
                "backend": "reference",
                "endpoints": [{"url": urls[t]}],
            }
            for t in TIERS
        ],
    }


@contextmanager
def router_server(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """A `foveal router serve` subprocess on `config`; yields the gateway's base URL."""
    path = workdir / f"router-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{config['gateway']['port']}"
    with foveal_subprocess(("foveal", "router", "serve", "--config", str(path)), url, "/readyz"):
        yield url


@dataclass
class Answer:
    """One request through the router and what its decision record says."""

    index: int  # sample index
    tier: str  # the tier that answered
    chosen: str  # the tier the policy chose (before fallback)
    text: str
    correct: bool
    pool_s: float  # pool-seconds the router measured (all attempts)
    propensity: float
    cost: float | None
    features: dict[str, Any] = field(default_factory=dict)


class RouterClient:
    """Ask the router's gateway, read the decision back, optionally send feedback (aiohttp)."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._http = session

    async def ask(
        self,
        index: int,
        image_uri: str,
        question: str,
        reference: str,
        *,
        model: str = "auto",
        feedback: bool = False,
    ) -> Answer:
        body = {
            "model": model,
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_uri}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
        }
        async with self._http.post(f"{self.url}/v1/chat/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"router answered {r.status}: {(await r.text())[:500]}")
            text = (await r.json())["choices"][0]["message"]["content"] or ""
            request_id = r.headers["x-foveal-request-id"]
            token = r.headers["x-foveal-feedback-token"]
        correct = answers_match(text, reference)
        if feedback:
            fb_body = {"request_id": request_id, "score": 1.0 if correct else 0.0, "token": token}
            async with self._http.post(f"{self.url}/v1/feedback", json=fb_body) as fb:
                if fb.status >= 300:
                    raise RuntimeError(f"feedback refused ({fb.status}): {(await fb.text())[:300]}")
        d = await self._decision(request_id)
        return Answer(
            index=index,
            tier=d["tier"],
            chosen=d.get("chosen_tier") or d["tier"],
            text=text,
            correct=correct,
            pool_s=(d.get("pool_latency_ms") or 0.0) / 1000,
            propensity=float(d.get("propensity") or 1.0),
            cost=d.get("cost"),
            features=d.get("features") or {},
        )

    async def _decision(self, request_id: str) -> dict[str, Any]:
        status, text = 0, ""
        for _ in range(50):  # the record may still sit in the writer's batch (served from
            async with self._http.get(f"{self.url}/v1/decisions/{request_id}") as r:  # memory)
                if r.status == 200:
                    return dict(await r.json())
                status, text = r.status, await r.text()
            await asyncio.sleep(0.02)
        raise RuntimeError(f"decision {request_id} not found: {status} {text[:200]}")


def run_requests(
    url: str,
    items: Sequence[tuple[int, str, str, str]],
    *,
    model: str = "auto",
    feedback: bool = False,
    progress: Any = None,
) -> list[Answer]:
    """Ask every (index, image URI, question, answer) in order (concurrency 1: clean timings)."""

    async def main() -> list[Answer]:
        out = []
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = RouterClient(url, session)
            for index, uri, question, reference in items:
                out.append(
                    await client.ask(
                        index, uri, question, reference, model=model, feedback=feedback
                    )
                )
                if progress is not None:
                    progress()
        return out

    return asyncio.run(main())


def engine_seconds(urls: dict[str, str]) -> dict[str, float]:
    """Each pool's engine busy seconds so far (`foveal_pool_server_batch_duration_seconds_sum`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for tier, url in urls.items():
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "foveal_pool_server_batch_duration_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
        out[tier] = total
    return out
