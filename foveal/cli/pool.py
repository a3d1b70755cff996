"""``foveal pool``: serve one visual-token tier of the reference VLM behind the pool contract."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from foveal.cli.logs import configure_logging

__all__ = ["pool_app"]

pool_app = typer.Typer(
    help="Pool servers: the reference VLM behind the OpenAI-compatible pool contract.",
    no_args_is_help=True,
)
console = Console(stderr=True)

_MECHANISMS = ("resolution", "pool", "cls-topk", "kcenter")  # checked against the model's too


@pool_app.command("serve")
def serve(
    tier: Annotated[
        str | None, typer.Option(help="Tier name, e.g. t16 (tN gives N visual tokens).")
    ] = None,
    mechanism: Annotated[
        str,
        typer.Option(help=f"How the tier gets its visual tokens: {', '.join(_MECHANISMS)}."),
    ] = "resolution",
    visual_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Visual tokens per image (default: read from the tier name)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one).")] = 8000,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Reference-VLM checkpoint (default: the shipped one).")
    ] = None,
    model: Annotated[str, typer.Option(help="Model name served (the tier's model).")] = (
        "foveal-ref"
    ),
    max_batch: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 8,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long a batch waits for more requests (ms).")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Waiting requests beyond which new ones get HTTP 429.")
    ] = 64,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Cap on generated tokens, whatever max_tokens asks.")
    ] = 48,
    threads: Annotated[int, typer.Option(min=1, help="torch intra-op threads.")] = 2,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    runtime: Annotated[
        str, typer.Option(help="torch: one tier in this process; ray: --tiers on Ray Serve.")
    ] = "torch",
    tiers: Annotated[
        str | None, typer.Option(help="Ray runtime: tiers to serve, e.g. t1,t4,t16,t64,t256.")
    ] = None,
    min_replicas: Annotated[int, typer.Option(min=0, help="Ray: replicas per tier, least.")] = 1,
    max_replicas: Annotated[int, typer.Option(min=1, help="Ray: replicas per tier, most.")] = 2,
    target_ongoing_requests: Annotated[
        float, typer.Option(min=0.01, help="Ray: requests in flight per replica to scale for.")
    ] = 8.0,
    num_cpus: Annotated[
        float, typer.Option(min=0.01, help="Ray: logical CPUs per replica (sets its threads).")
    ] = 0.2,
) -> None:
    """Serve one tier: /v1/chat/completions, /v1/models, /health, /metrics.

    SIGTERM or Ctrl-C drains: /health turns 503, new connections are refused, every request
    already received (running or queued) is answered, then the process exits 0 (a second
    Ctrl-C stops at once).

    With --runtime ray, every tier of --tiers is one deployment of a single Ray Serve
    application on host:port, the tier's base URL being http://host:port/<tier>.
    """
    configure_logging("text", log_level)
    if runtime == "ray":
        from foveal.cli.pool_ray import serve_ray

        return serve_ray(
            tiers=tiers,
            tier=tier,
            mechanism=mechanism,
            host=host,
            port=port,
            checkpoint=checkpoint,
            model=model,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            max_queue=max_queue,
            max_new_tokens=max_new_tokens,
            scaling=(min_replicas, max_replicas, target_ongoing_requests, num_cpus),
        )
    if runtime != "torch":
        raise typer.BadParameter(
            f"unknown runtime {runtime!r}: torch or ray", param_hint="--runtime"
        )
    if tiers is not None:
        raise typer.BadParameter("--tiers needs --runtime ray (use --tier)", param_hint="--tiers")
    if tier is None:
        raise typer.BadParameter("which tier to serve, e.g. --tier t16", param_hint="--tier")
    from foveal.pools.engine import tier_tokens

    try:
        tokens = visual_tokens if visual_tokens is not None else tier_tokens(tier)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tier") from None
    import torch

    from foveal.pools.engine import EngineSettings, PoolEngine, check_tier
    from foveal.pools.reference.checkpoint import SHIPPED, load_checkpoint
    from foveal.pools.server import PoolServer

    try:
        check_tier(tokens, mechanism)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mechanism/--visual-tokens") from None
    torch.set_num_threads(threads)
    path = checkpoint or SHIPPED
    try:
        vlm = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--checkpoint") from None
    try:
        check_tier(tokens, mechanism, vlm.config.max_tokens)
        settings = EngineSettings(
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            max_queue=max_queue,
            max_new_tokens=max_new_tokens,
            threads=threads,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    engine = PoolEngine(
        vlm,
        visual_tokens=tokens,
        mechanism=mechanism,
        model_name=model,
        tier=tier,
        settings=settings,
    )
    try:
        server = PoolServer(engine, host=host, port=port, log_level=log_level.lower())
    except OSError as exc:
        raise typer.BadParameter(f"cannot bind {host}:{port}: {exc}", param_hint="--port") from None
    console.print(
        f"pool {tier}: {model} ({mechanism}, {tokens} visual tokens, checkpoint {path}) "
        f"on {server.url} — batch {max_batch}, wait {batch_wait_ms} ms, queue {max_queue}"
    )
    server.run()
    console.print(f"pool {tier}: drained and stopped")
