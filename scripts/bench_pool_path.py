"""Where a reference pool's time per request goes at concurrency 1, tier by tier.

Three layers, one torch thread each, the same requests (the suite's test split):

- model: ``ReferenceVLM.generate`` on one image, in this process;
- engine: ``PoolEngine.generate`` in this process (queue, executor thread, answer cutting);
- server: a real ``foveal pool serve`` subprocess over loopback HTTP, one request at a time
  (the load generator of ``foveal bench tiers``), and the server's own forward time per
  request from its ``foveal_pool_server_batch_duration_seconds`` metric.

    .venv/bin/python scripts/bench_pool_path.py --tiers t1,t256 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from foveal.bench.routing_stack import engine_seconds
from foveal.bench.tiers import _body, _load, load_samples, pool_server
from foveal.pools.engine import EngineSettings, PoolEngine, tier_tokens
from foveal.pools.reference.checkpoint import SHIPPED, load_checkpoint
from foveal.pools.reference.data import image_tensor


async def _engine_ms(engine: PoolEngine, images: list[torch.Tensor], questions: list[str]) -> float:
    times = []
    for image, question in zip(images, questions, strict=True):
        t0 = time.perf_counter()
        await engine.generate(image, question, max_tokens=16)
        times.append(time.perf_counter() - t0)
    await engine.close()
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiers", default="t1,t256")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--per-family", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    samples = load_samples(None, args.per_family)
    work = [samples[i % len(samples)] for i in range(args.requests)]
    model = load_checkpoint()
    images = list(image_tensor([s.image for s in work], model.config.image_size))
    questions = [s.question for s in work]
    rows = {}
    for tier in args.tiers.split(","):
        k = tier_tokens(tier)
        times = []
        for image, question in zip(images, questions, strict=True):
            t0 = time.perf_counter()
            model.generate(image[None], [question], k, max_new_tokens=16)
            times.append(time.perf_counter() - t0)
        model_ms = 1000 * statistics.median(times)
        engine = PoolEngine(model, visual_tokens=k, settings=EngineSettings(threads=1))
        engine_ms = asyncio.run(_engine_ms(engine, images, questions))
        bodies = [_body(s.image, s.question) for s in work]
        with pool_server(tier, SHIPPED) as url:
            asyncio.run(_load(url, bodies[:8], 1))  # warm-up
            busy = engine_seconds({tier: url})[tier]
            http_ms = 1000 * statistics.median(asyncio.run(_load(url, bodies, 1)))
            busy = engine_seconds({tier: url})[tier] - busy
        forward_ms = 1000 * busy / len(bodies)  # one request at a time: one forward pass each
        rows[tier] = (model_ms, engine_ms, forward_ms, http_ms)
        print(
            f"{tier:>5}  model {model_ms:6.2f} ms  engine {engine_ms:6.2f} ms  "
            f"server forward {forward_ms:6.2f} ms  HTTP request {http_ms:6.2f} ms",
            flush=True,
        )
    names = list(rows)
    if len(names) >= 2:
        lo, hi = rows[names[0]], rows[names[-1]]
        layers = ("model", "engine", "server forward", "HTTP request")
        ratios = "  ".join(f"{n} {h / lo_:.1f}x" for n, lo_, h in zip(layers, lo, hi, strict=True))
        print(f"{names[-1]} / {names[0]} time per request: {ratios}")


if __name__ == "__main__":
    main()
