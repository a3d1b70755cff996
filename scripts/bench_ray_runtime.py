"""Start-up time and per-request latency: the Ray Serve runtime against the plain pool server.

    python scripts/bench_ray_runtime.py [--requests 200] [--tiers t1,t4,t16,t64,t256]

Both serve tier t16 of a randomly initialised reference VLM (same architecture, so the same
cost as the shipped checkpoint; ``max_tokens`` is fixed so every answer has the same length)
with one torch thread each: the plain server as ``foveal pool serve`` in its own process, the
Ray runtime as ``foveal.pools.ray_app.RayPoolApp``. Prints p50/p90/p99 of sequential requests
and requests/s with 8 concurrent clients, then the Ray start-up time with every tier of
``--tiers``. Ray is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from foveal.pools.ray_app import RayAutoscaling, RayPoolApp, RayPoolConfig, free_port, parse_tiers
from foveal.pools.reference.checkpoint import save_checkpoint
from foveal.pools.reference.model import build_model
from foveal.testing.images import image_message

BODY = json.dumps(
    {"model": "foveal-ref", "messages": [image_message("what colour is it")], "max_tokens": 8}
).encode()


def post(base: str) -> float:
    req = urllib.request.Request(
        base + "/v1/chat/completions", BODY, {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
    return time.perf_counter() - t0


def measure(name: str, base: str, n: int) -> None:
    for _ in range(20):  # warm-up
        post(base)
    lat = sorted(post(base) for _ in range(n))

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda _: post(base), range(n)))
    rps = n / (time.perf_counter() - t0)
    print(
        f"{name}: p50 {q(0.5):.1f} ms, p90 {q(0.9):.1f} ms, p99 {q(0.99):.1f} ms "
        f"(sequential, n={n}); {rps:.0f} req/s with 8 concurrent clients",
        flush=True,
    )


def plain(checkpoint: Path, n: int) -> None:
    port = free_port()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "foveal", "pool", "serve", "--tier", "t16"]
    cmd += ["--checkpoint", str(checkpoint), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"plain: ready in {time.perf_counter() - t0:.1f} s (process start to /health 200)")
        measure("plain", f"http://127.0.0.1:{port}", n)
    finally:
        proc.terminate()
        proc.wait(30)


def ray(checkpoint: Path, tiers: str, n: int | None) -> None:
    config = RayPoolConfig(
        tiers=parse_tiers(tiers),
        checkpoint=str(checkpoint),
        port=free_port(),
        autoscaling=RayAutoscaling(num_cpus=0.2),
    )
    with RayPoolApp(config, num_cpus=2) as app:
        print(f"ray [{tiers}]: ready in {app.startup_s:.1f} s (ray.init + serve.run)", flush=True)
        if n is not None:
            measure("ray", app.endpoints()["t16"], n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tiers", default="t1,t4,t16,t64,t256")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random.pt"
        save_checkpoint(build_model(), checkpoint)
        plain(checkpoint, args.requests)
        ray(checkpoint, "t16", args.requests)
        ray(checkpoint, args.tiers, None)


if __name__ == "__main__":
    main()
