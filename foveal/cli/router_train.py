"""``foveal router train`` (the sufficiency model) and ``foveal bench outcomes`` (its data)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["bench_outcomes", "router_train"]

console = Console()


def router_train(
    out: Annotated[
        Path, typer.Option(help="Artifact to write (.npz; its .json metadata goes beside it).")
    ],
    outcomes: Annotated[
        list[Path] | None,
        typer.Option(help="`foveal bench outcomes` file(s) to train on (repeatable)."),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Also train on this store's decisions that have feedback (score >= 0.5 counts "
            "as correct; decisions of the `model`/bandit policies record their feature vector)."
        ),
    ] = None,
    kind: Annotated[str, typer.Option(help="Model kind: hgb or logreg.")] = "hgb",
    calibrate: Annotated[
        bool, typer.Option(help="Isotonic calibration per tier (out-of-fold).")
    ] = True,
    holdout: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Share of samples held out for the metrics.")
    ] = 0.2,
    version: Annotated[
        str | None, typer.Option(help="Version recorded in the artifact (default: kind-time).")
    ] = None,
    features: Annotated[
        str,
        typer.Option(
            help="Feature groups the model sees (comma-separated of image, text, session), "
            "e.g. `image` for an image-only model to compare against."
        ),
    ] = "image,text,session",
) -> None:
    """Train the sufficiency model P(correct | features, tier) and write a versioned artifact."""
    import numpy as np

    from foveal.router.sufficiency import (
        TrainingSet,
        read_outcomes,
        train_model,
        training_set_from_outcomes,
        training_set_from_store,
    )

    if not outcomes and not store:
        raise typer.BadParameter("give --outcomes FILE and/or --store URL", param_hint="--outcomes")
    if kind not in ("hgb", "logreg"):
        raise typer.BadParameter(f"expected hgb or logreg, got {kind!r}", param_hint="--kind")
    parts: list[TrainingSet] = []
    checkpoints: set[str] = set()
    try:
        for path in outcomes or []:
            rows = read_outcomes(path)
            checkpoints |= {o.checkpoint for o in rows if o.checkpoint}
            parts.append(training_set_from_outcomes(rows, source=path.name))
            console.print(f"{path}: {len(rows)} outcome rows")
        if store:
            parts.append(training_set_from_store(store))
            console.print(f"store: {len(parts[-1])} decisions with feedback")
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    ts = TrainingSet(
        X=np.vstack([p.X for p in parts]),
        tiers=np.concatenate([p.tiers for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        groups=np.concatenate([p.groups for p in parts]),
        families=np.concatenate([p.families for p in parts]),
        source=", ".join(p.source for p in parts),
    )
    if version is None and len(checkpoints) == 1:  # name the reference checkpoint it learnt
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        version = f"{kind}-ref{next(iter(checkpoints))[:8]}-{stamp}"
    try:
        model = train_model(
            ts,
            kind=kind,
            calibrate=calibrate,
            holdout=holdout,
            version=version,
            feature_groups=[g.strip() for g in features.split(",") if g.strip()],
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if checkpoints:
        model.metadata["outcomes_checkpoint"] = sorted(checkpoints)
    model.save(out)
    m = model.metadata.get("metrics", {}).get("holdout")
    console.print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB), version {model.version}")
    if m:
        console.print(
            f"held-out: AUC {m['auc']:.3f}  Brier {m['brier']:.3f}  ECE {m['ece']:.3f}  "
            f"({m['rows']} rows)"
        )


def bench_outcomes(
    out: Annotated[Path, typer.Option(help="JSONL file to write (images go to ./images/).")],
    split: Annotated[str, typer.Option(help="Suite split: train, validation or test.")] = "train",
    per_family: Annotated[int, typer.Option(min=1, help="Samples per family.")] = 300,
    dataset: Annotated[
        Path | None, typer.Option(help="Use this dataset (suite JSONL format) instead.")
    ] = None,
    tiers: Annotated[str, typer.Option(help="Comma-separated tiers.")] = "t1,t4,t16,t64,t256",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Reference-VLM checkpoint (default: the shipped one).")
    ] = None,
    embed: Annotated[bool, typer.Option(help="Images as data URIs in the rows.")] = False,
    seed: Annotated[int, typer.Option(help="Offset added to the split's seed.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
) -> None:
    """Run the reference VLM on a split at every tier: one outcome row per (sample, tier)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from foveal.bench.outcomes import run_outcomes, samples_for

    try:
        samples = list(samples_for(split, per_family, dataset=dataset, seed=seed))
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    names = [t.strip() for t in tiers.split(",") if t.strip()]
    with Progress(
        TextColumn("[bold]outcomes"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} samples"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("outcomes", total=len(samples))
        try:
            summary = run_outcomes(
                out,
                samples,
                tiers=names,
                checkpoint=checkpoint,
                embed=embed,
                threads=threads,
                progress=lambda done, _total: bar.update(task, completed=done),
            )
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--tiers") from None
    console.print(f"wrote {summary['rows']} rows to {out} in {summary['seconds']}s")
    acc = summary["accuracy"]
    fams = sorted({k.split("/")[0] for k in acc})
    console.print("family      " + "".join(f"{t:>7}" for t in names))
    for fam in fams:
        cells = "".join(f"{100 * acc.get(f'{fam}/{t}', float('nan')):>6.1f}%" for t in names)
        console.print(f"{fam:<12}{cells}")
