"""``foveal pool serve --runtime ray``: every tier as one Ray Serve application (the ray extra)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

__all__ = ["serve_ray"]

console = Console(stderr=True)


def serve_ray(
    *,
    tiers: str | None,
    tier: str | None,
    mechanism: str,
    host: str,
    port: int,
    checkpoint: Path | None,
    model: str,
    max_batch: int,
    batch_wait_ms: float,
    max_queue: int,
    max_new_tokens: int,
    scaling: tuple[int, int, float, float],
) -> None:
    """Check the options, start the application, serve until SIGINT/SIGTERM, stop cleanly."""
    if tier is not None:
        raise typer.BadParameter(
            "use --tiers with --runtime ray, e.g. --tiers t1,t16", param_hint="--tier"
        )
    if tiers is None:
        raise typer.BadParameter(
            "which tiers to serve, e.g. --tiers t1,t4,t16,t64,t256", param_hint="--tiers"
        )
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "--runtime ray needs Ray Serve: pip install 'foveal[ray]'", param_hint="--runtime"
        ) from None
    from foveal.pools.engine import check_tier
    from foveal.pools.ray_app import (
        RayAutoscaling,
        RayPoolApp,
        RayPoolConfig,
        free_port,
        parse_tiers,
        serve_until_signal,
    )
    from foveal.pools.reference.checkpoint import SHIPPED

    try:
        parsed = parse_tiers(tiers)
        for t in parsed:
            check_tier(t.visual_tokens, mechanism)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tiers/--mechanism") from None
    path = checkpoint or SHIPPED
    if not path.is_file():
        raise typer.BadParameter(f"no checkpoint at {path}", param_hint="--checkpoint")
    min_replicas, max_replicas, target, num_cpus = scaling
    try:
        config = RayPoolConfig(
            tiers=parsed,
            mechanism=mechanism,
            checkpoint=str(path),
            model_name=model,
            host=host,
            port=port or free_port(host),
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            max_queue=max_queue,
            max_new_tokens=max_new_tokens,
            autoscaling=RayAutoscaling(
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                target_ongoing_requests=target,
                num_cpus=num_cpus,
            ),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    def ready(app: RayPoolApp) -> None:
        console.print(
            f"Ray Serve application {config.app_name!r} ready in {app.startup_s:.1f} s "
            f"({mechanism}; replicas {min_replicas}..{max_replicas} per tier, "
            f"{num_cpus} CPU each)"
        )
        for name, url in app.endpoints().items():
            console.print(f"  {name}: {url}")

    serve_until_signal(config, on_ready=ready)
    console.print("Ray Serve application stopped")
