"""``foveal vlm``: train and evaluate the reference VLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["vlm_app"]

vlm_app = typer.Typer(help="The reference VLM (train, evaluate).", no_args_is_help=True)
console = Console()


def _shipped() -> Path:
    from foveal.pools.reference.checkpoint import SHIPPED

    return SHIPPED


@vlm_app.command("train")
def train(
    out: Annotated[
        Path | None, typer.Option(help="Checkpoint to write (default: the shipped one).")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 9000,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the schedule and the samples.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
    evaluate_per_family: Annotated[
        int, typer.Option("--eval", min=0, help="Held-out samples per family to evaluate after.")
    ] = 100,
) -> None:
    """Train the reference VLM on the suite's training split (resumes an interrupted run)."""
    from foveal.bench.training import TrainConfig, evaluate, format_table, heldout
    from foveal.bench.training import train as run_training

    path = out or _shipped()
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, threads=threads)
    with Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=cfg.steps, loss=float("nan"))

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, loss=loss)
            if not console.is_terminal and step % 100 == 0:  # logs get a line per 100 steps
                console.print(f"step {step}/{total} loss {loss:.3f}")

        model = run_training(cfg, path, progress=progress)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if evaluate_per_family:
        from foveal.bench.suite import SPLIT_SEEDS

        res = evaluate(model, heldout(evaluate_per_family, SPLIT_SEEDS["validation"]))
        console.print(format_table(res))
