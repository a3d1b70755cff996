"""`foveal bench overhead`: what the gateway adds on top of calling a pool directly.

Three processes on loopback: a fast fake pool, the router (gateway + gRPC, SQLite store), and
this process as the load generator (aiohttp, a fixed number of requests per run). For a text
request and a 1024x1024 JPEG request it measures latency at concurrency 1 (direct vs through
the gateway: the difference is the added latency) and requests/s at concurrency 1/16/64.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

__all__ = ["run_overhead"]

CONCURRENCY = (1, 16, 64)


@dataclass
class Run:
    payload: str
    target: str  # direct | gateway
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpeg_data_uri(size: int = 1024, seed: int = 0) -> str:
    """A photo-like JPEG (gradients + noise), quality 90, as a data URI."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200
    img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _bodies() -> dict[str, dict[str, Any]]:
    text = {"messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 8}
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": jpeg_data_uri()}},
                ],
            }
        ],
        "max_tokens": 8,
    }
    return {"text": text, "jpeg1024": image}


async def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout_s}s")


async def _load(url: str, body: bytes, concurrency: int, n: int) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    remaining = n
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


async def _measure(pool_url: str, gw_url: str, requests: int, console: Console) -> list[Run]:
    runs: list[Run] = []
    for name, body in _bodies().items():
        direct_body = json.dumps({**body, "model": "foveal-ref"}).encode()
        gw_body = json.dumps({**body, "model": "t16"}).encode()
        for target, url, raw in (
            ("direct", f"{pool_url}/v1/chat/completions", direct_body),
            ("gateway", f"{gw_url}/v1/chat/completions", gw_body),
        ):
            await _load(url, raw, 4, 50)  # warm-up: connections, caches
            for c in CONCURRENCY:
                n = requests if c > 1 else max(200, requests // 2)
                if name != "text":
                    n = max(100, n // 4)
                lat, errors, wall = await _load(url, raw, c, n)
                ms = np.array(lat) * 1000
                run = Run(
                    name,
                    target,
                    c,
                    n,
                    errors,
                    n / wall,
                    float(np.percentile(ms, 50)),
                    float(np.percentile(ms, 99)),
                )
                console.print(
                    f"  {name:9s} {target:8s} c={c:<3d} {run.rps:8.0f} req/s  "
                    f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  errors {errors}"
                )
                runs.append(run)
    return runs


def _table(runs: list[Run]) -> Table:
    table = Table(
        "payload",
        "concurrency",
        "direct req/s",
        "gateway req/s",
        "direct p50 ms",
        "gateway p50 ms",
        "added p50 ms",
        "added p99 ms",
        title="Gateway overhead",
    )
    index = {(r.payload, r.target, r.concurrency): r for r in runs}
    for payload in dict.fromkeys(r.payload for r in runs):
        for c in CONCURRENCY:
            d, g = index[(payload, "direct", c)], index[(payload, "gateway", c)]
            table.add_row(
                payload,
                str(c),
                f"{d.rps:.0f}",
                f"{g.rps:.0f}",
                f"{d.p50_ms:.2f}",
                f"{g.p50_ms:.2f}",
                f"{g.p50_ms - d.p50_ms:.2f}",
                f"{g.p99_ms - d.p99_ms:.2f}",
            )
    return table


def run_overhead(*, requests: int, out: Path | None, console: Console) -> list[Run]:
    pool_port, gw_port, grpc_port = _free_port(), _free_port(), _free_port()
    pool_url, gw_url = f"http://127.0.0.1:{pool_port}", f"http://127.0.0.1:{gw_port}"
    with tempfile.TemporaryDirectory(prefix="foveal-bench-") as tmp:
        config = {
            "gateway": {"host": "127.0.0.1", "port": gw_port},
            "grpc": {"host": "127.0.0.1", "port": grpc_port},
            "store": {"url": f"sqlite:///{tmp}/bench.db"},
            "log_level": "WARNING",
            "tiers": [
                {
                    "name": n,
                    "visual_tokens": k,
                    "cost_weight": k,
                    "backend": "fake",
                    "endpoints": [{"url": pool_url}],
                }
                for n, k in (("t1", 1), ("t4", 4), ("t16", 16), ("t64", 64), ("t256", 256))
            ],
        }
        cfg = Path(tmp) / "foveal.yaml"
        cfg.write_text(yaml.safe_dump(config))
        pool = _start(
            [
                sys.executable,
                "-m",
                "foveal.testing.fakepool",
                "--host",
                "127.0.0.1",
                "--port",
                str(pool_port),
                "--visual-tokens",
                "16",
                "--model",
                "foveal-ref",
            ]
        )
        router = None
        try:
            router = _start(
                [sys.executable, "-m", "foveal", "router", "serve", "--config", str(cfg)]
            )
            asyncio.run(_wait_http(f"{pool_url}/health"))
            asyncio.run(_wait_http(f"{gw_url}/readyz"))
            console.print(
                f"fake pool {pool_url} (pid {pool.pid}), gateway {gw_url} "
                f"(pid {router.pid}), load generator pid {os.getpid()}; "
                f"{os.cpu_count()} CPUs"
            )
            runs = asyncio.run(_measure(pool_url, gw_url, requests, console))
        finally:
            if router is not None:
                _stop(router)
            _stop(pool)
    console.print(_table(runs))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(r) for r in runs], indent=2))
        console.print(f"wrote {out}")
    return runs
