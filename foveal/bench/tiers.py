"""`foveal bench tiers`: what each visual-token tier of the reference VLM costs and answers.

Three measurements per tier:

- **accuracy** per family x tier x mechanism on a held-out dataset (the suite's test split, or
  any dataset in the suite's JSONL format), greedy exact match;
- **speed** of real pool servers (`foveal pool serve`, one subprocess per tier on loopback) under
  a load generator: ms/request at concurrency 1 and requests/s at concurrency 16, both with the
  resolution mechanism (the server batches concurrent requests dynamically);
- **prefill FLOPs** per request from the model's shapes (the offline cost of a tier).

Writes ``DIR/tiers.json`` and ``DIR/tiers.png`` and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
from PIL import Image
from rich.console import Console
from rich.table import Table

from foveal.bench.suite import FAMILIES, SPLIT_SEEDS, generate_suite, read_dataset
from foveal.bench.suite.dataset import image_data_uri
from foveal.bench.training import TIERS, EvalResult, evaluate
from foveal.pools.reference.checkpoint import SHIPPED, load_checkpoint
from foveal.pools.reference.compress import MECHANISMS


@dataclass
class Speed:
    tier: str
    ms_per_request_c1: float
    p99_ms_c1: float
    rps_c1: float
    rps_c16: float
    ms_per_request_c16: float


def load_samples(dataset: Path | None, per_family: int) -> list[Any]:
    """Rows of `dataset` (a JSONL file or a folder with test.jsonl), else the suite's test split."""
    if dataset is not None:
        path = dataset / "test.jsonl" if dataset.is_dir() else dataset
        return list(read_dataset(path))
    return list(generate_suite(per_family * len(FAMILIES), seed=SPLIT_SEEDS["test"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def pool_server(
    tier: str, checkpoint: Path, mechanism: str = "resolution", threads: int = 1
) -> Iterator[str]:
    """A `foveal pool serve` subprocess on a free loopback port; yields its base URL."""
    port = _free_port()
    cmd = [
        *("foveal", "pool", "serve", "--tier", tier, "--mechanism", mechanism),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--checkpoint", str(checkpoint), "--threads", str(threads)),
    ]
    with foveal_subprocess(cmd, f"http://127.0.0.1:{port}", "/health") as url:
        yield url


@contextmanager
def foveal_subprocess(
    args: Sequence[str], url: str, ready_path: str, timeout_s: float = 60.0
) -> Iterator[str]:
    """`python -m <args>` until `url + ready_path` answers 200; SIGTERM (then SIGKILL) after.

    Its output goes to a temporary file, quoted in the error if it exits before it is ready."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url + ready_path, proc, log, timeout_s)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def _body(image: Image.Image, question: str) -> dict[str, Any]:
    uri = image_data_uri(image)
    return {
        "model": "foveal-ref",
        "max_tokens": 16,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }


async def _load(url: str, bodies: Sequence[dict[str, Any]], concurrency: int) -> list[float]:
    """Send every body with `concurrency` workers; per-request latencies in seconds."""
    latencies: list[float] = []
    queue = list(bodies)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"pool answered {r.status}")
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def measure_speed(url: str, tier: str, samples: Sequence[Any], requests: int) -> Speed:
    bodies = [_body(s.image, s.question) for s in samples]
    work = [bodies[i % len(bodies)] for i in range(requests)]
    asyncio.run(_load(url, work[:8], 1))  # warm-up
    t0 = time.perf_counter()
    lat1 = asyncio.run(_load(url, work, 1))
    wall1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    lat16 = asyncio.run(_load(url, work * 2, 16))
    wall16 = time.perf_counter() - t0
    lat1.sort()
    return Speed(
        tier=tier,
        ms_per_request_c1=1000 * statistics.median(lat1),
        p99_ms_c1=1000 * lat1[min(len(lat1) - 1, int(0.99 * len(lat1)))],
        rps_c1=len(lat1) / wall1,
        rps_c16=len(lat16) / wall16,
        ms_per_request_c16=1000 * statistics.median(lat16),
    )


def run_tiers(
    out: Path,
    *,
    dataset: Path | None = None,
    per_family: int = 100,
    requests: int = 100,
    mechanisms: Sequence[str] = MECHANISMS,
    checkpoint: Path | None = None,
    threads: int = 1,
    console: Console | None = None,
) -> dict[str, Any]:
    """Accuracy of `checkpoint` per family x tier x mechanism, then the speed of one real pool
    server per tier (`threads` torch threads each; 0 requests skips the speed runs)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    console = console or Console()
    checkpoint = checkpoint or SHIPPED
    model = load_checkpoint(checkpoint)
    samples = load_samples(dataset, per_family)
    console.print(f"evaluating {len(samples)} samples x {len(TIERS)} tiers x {len(mechanisms)}")
    t0 = time.perf_counter()
    acc = evaluate(model, samples, TIERS, mechanisms)
    console.print(f"accuracy done in {time.perf_counter() - t0:.0f}s")
    speeds: list[Speed] = []
    if requests:
        for k in TIERS:
            with pool_server(f"t{k}", checkpoint, threads=threads) as url:
                speeds.append(measure_speed(url, f"t{k}", samples[:64], requests))
    result = _result(model, acc, speeds, samples, mechanisms, dataset, threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiers.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_tiers(result, out / "tiers.png")
    print_tiers(result, console)
    return result


def _result(
    model: Any,
    acc: EvalResult,
    speeds: list[Speed],
    samples: Sequence[Any],
    mechanisms: Sequence[str],
    dataset: Path | None,
    threads: int,
) -> dict[str, Any]:
    fams = [f for f in FAMILIES if any(s.family == f for s in samples)]
    fams += sorted({s.family for s in samples} - set(fams))
    accuracy: dict[str, dict[str, dict[str, float | None]]] = {}
    for mech in mechanisms:
        accuracy[mech] = {}
        for f in [*fams, "overall"]:
            row: dict[str, float | None] = {}
            for k in TIERS:
                a = acc.accuracy(None if f == "overall" else f, k, mech)
                if mech != "resolution" and k == TIERS[-1]:  # no compression at the full grid
                    a = acc.accuracy(None if f == "overall" else f, k, "resolution")
                row[f"t{k}"] = None if a != a else round(a, 4)
            accuracy[mech][f] = row
    return {
        "dataset": str(dataset) if dataset else "suite test split",
        "samples": len(samples),
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads},
        "accuracy": accuracy,
        "prefill_flops": {
            mech: {f"t{k}": model.prefill_flops(k, mech) for k in TIERS} for mech in mechanisms
        },
        "speed": {s.tier: s.__dict__ for s in speeds},
    }


def print_tiers(result: dict[str, Any], console: Console) -> None:
    for mech, rows in result["accuracy"].items():
        table = Table(title=f"exact match (%), mechanism {mech}")
        table.add_column("family")
        for k in TIERS:
            table.add_column(f"t{k}", justify="right")
        for fam, row in rows.items():
            cells = ["-" if v is None else f"{100 * v:.1f}" for v in row.values()]
            table.add_row(fam, *cells)
        console.print(table)
    table = Table(title="cost per tier (resolution mechanism)")
    for col in ("tier", "GFLOPs", "ms/req c=1", "p99 c=1", "req/s c=1", "req/s c=16"):
        table.add_column(col, justify="right")
    flops = result["prefill_flops"].get("resolution", {})
    for k in TIERS:
        s = result["speed"].get(f"t{k}")
        cells = (
            [
                f"{s['ms_per_request_c1']:.1f}",
                f"{s['p99_ms_c1']:.1f}",
                f"{s['rps_c1']:.1f}",
                f"{s['rps_c16']:.1f}",
            ]
            if s
            else ["-"] * 4
        )
        table.add_row(f"t{k}", f"{flops.get(f't{k}', 0) / 1e9:.3f}", *cells)
    console.print(table)
    sp = result["speed"]
    if "t1" in sp and f"t{TIERS[-1]}" in sp:
        top = sp[f"t{TIERS[-1]}"]
        console.print(
            f"t1 vs t{TIERS[-1]}: {sp['t1']['rps_c1'] / top['rps_c1']:.1f}x req/s at c=1, "
            f"{sp['t1']['rps_c16'] / top['rps_c16']:.1f}x at c=16"
        )


def plot_tiers(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = list(range(len(TIERS)))
    labels = [f"t{k}" for k in TIERS]
    res = result["accuracy"].get("resolution", {})
    for fam, row in res.items():
        ys = [100 * v if v is not None else float("nan") for v in row.values()]
        axes[0].plot(x, ys, marker="o", lw=2.5 if fam == "overall" else 1.2, label=fam)
    axes[0].set(title="accuracy by family (resolution)", ylabel="exact match %", ylim=(-2, 102))
    for mech, rows in result["accuracy"].items():
        ys = [100 * v if v is not None else float("nan") for v in rows["overall"].values()]
        axes[1].plot(x, ys, marker="o", label=mech)
    axes[1].set(title="overall accuracy by mechanism", ylim=(-2, 102))
    flops = result["prefill_flops"].get("resolution", {})
    axes[2].bar(x, [flops[t] / 1e9 for t in labels], color="#bbb", label="prefill GFLOPs")
    axes[2].set(title="cost per request", ylabel="GFLOPs")
    if result["speed"]:
        ax2 = axes[2].twinx()
        ms = [result["speed"][t]["ms_per_request_c1"] for t in labels if t in result["speed"]]
        ax2.plot(x[: len(ms)], ms, color="C3", marker="o", label="ms/request (c=1)")
        ax2.set_ylabel("ms/request")
        ax2.legend(loc="upper left")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
