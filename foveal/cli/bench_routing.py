"""``foveal bench routing``: routing strategies on real reference pools through a real router."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from foveal.cli.logs import configure_logging

__all__ = ["bench_routing"]

console = Console(width=170)  # the strategy table is wide


def bench_routing(
    out: Annotated[Path, typer.Option(help="Folder for routing.json, routing.png, shift.png.")] = (
        Path("bench-out")
    ),
    dataset: Annotated[
        Path | None,
        typer.Option(help="Dataset in the suite's JSONL format (file or folder with test.jsonl)."),
    ] = None,
    per_family: Annotated[
        int, typer.Option(min=1, help="Test-split samples per family (without --dataset).")
    ] = 50,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Reference-VLM checkpoint (default: the shipped one).")
    ] = None,
    quality_weight: Annotated[
        float, typer.Option(min=0.0, help="λ of the tenant policy: P(correct) - λ·cost.")
    ] = 0.05,
    quality_floor: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Tenant quality floor (predicted P).")
    ] = 0.0,
    cascade_threshold: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Cascade re-asks below this answer confidence."),
    ] = 0.5,
    text_model: Annotated[
        Path | None, typer.Option(help="Text-only sufficiency artifact (strategy text-only).")
    ] = None,
    image_model: Annotated[
        Path | None, typer.Option(help="Image-only sufficiency artifact (strategy image-only).")
    ] = None,
    strategy: Annotated[
        list[str] | None,
        typer.Option(help="Run only these routed strategies (repeatable; default: all)."),
    ] = None,
    shift_events: Annotated[
        int, typer.Option(min=0, help="Feedback events per phase of the workload-shift run.")
    ] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of the request order and random strategy.")] = 0,
) -> None:
    """Accuracy and cost of each routing strategy; the oracle gap; the workload-shift run."""
    from foveal.bench.routing import run_routing

    configure_logging("text", "WARNING")
    artifacts = {}
    for kind, path in (("text-only", text_model), ("image-only", image_model)):
        if path is not None:
            if not path.is_file():
                raise typer.BadParameter(f"{path} does not exist", param_hint=kind)
            artifacts[kind] = path
    run_routing(
        out,
        dataset=dataset,
        per_family=per_family,
        checkpoint=checkpoint,
        quality_weight=quality_weight,
        quality_floor=quality_floor,
        cascade_threshold=cascade_threshold,
        artifacts=artifacts,
        only=strategy,
        shift_events=shift_events,
        seed=seed,
        console=console,
    )
