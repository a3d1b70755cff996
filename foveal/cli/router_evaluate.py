"""`foveal router evaluate`: off-policy estimates of a routing policy before it is switched on."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["parse_since", "router_evaluate"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise) or a duration back from now: 90m, 24h, 7d."""
    value = text.strip()
    m = _DURATION.fullmatch(value)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO time (2025-01-31T12:00:00Z) nor a duration (90m, 24h, 7d)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _ci(low: float, high: float) -> str:
    return f"[{low:.3f}, {high:.3f}]"


def router_evaluate(
    policy: Annotated[str, typer.Option(help="The candidate policy, by registry name.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file.")
    ] = None,
    store: Annotated[str | None, typer.Option(help="Store URL (overrides config).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only decisions from then on: ISO time or 24h, 7d...")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only decisions before then.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's decisions.")] = None,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples for the intervals (0: normal approx).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Estimate a policy's accuracy and cost from logged decisions with feedback (IPS, SNIPS,
    doubly robust), with 95% intervals, before switching it on."""
    from foveal.cli.logs import configure_logging
    from foveal.config import load_settings
    from foveal.pools.catalog import Catalog
    from foveal.router import bandit_policy as _registers  # noqa: F401 (linucb, lints, model)
    from foveal.router.ope import OpeError, evaluate
    from foveal.router.policies import make_policy
    from foveal.store import Store

    settings = load_settings(config)
    configure_logging(settings.log_format, "WARNING")
    url = store or settings.store.url
    start = parse_since(since) if since else None
    end = parse_since(until) if until else None
    err = Console(stderr=True)
    try:
        candidate: Any = make_policy(settings.policy.model_copy(update={"name": policy}))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from None
    costs = {t.name: t.cost_weight for t in Catalog.from_settings(settings.tiers).tiers}
    db = Store(url)
    try:
        db.migrate()
        load = getattr(candidate, "load_state", None)
        if load is not None:  # a learning candidate is evaluated with its current state
            load(db)
        rows = db.iter_decisions_with_feedback(since=start, until=end, tenant=tenant)
        result = evaluate(candidate, rows, tier_costs=costs, bootstrap=bootstrap)
    except OpeError as exc:
        err.print(f"[red]cannot evaluate {policy!r}:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        db.close()
    if as_json:
        out = result.to_dict()
        out["since"] = start.isoformat() if start else None
        out["until"] = end.isoformat() if end else None
        typer.echo(json.dumps(out, indent=2))
        return
    console = Console()
    interval = f"{bootstrap}-resample bootstrap" if bootstrap else "normal approximation"
    table = Table(
        "estimator",
        "accuracy",
        "95% CI",
        "cost",
        "95% CI",
        "n",
        "effective n",
        title=f"policy {policy!r} on {result.n_logged} logged decisions with feedback",
        caption=f"intervals: {interval}; 'logged' is what the logging policies got",
    )
    for e in result.estimates:
        table.add_row(
            e.estimator,
            f"{e.accuracy.value:.3f}",
            _ci(e.accuracy.low, e.accuracy.high),
            f"{e.cost.value:.2f}",
            f"[{e.cost.low:.2f}, {e.cost.high:.2f}]",
            str(e.n),
            f"{e.ess:.0f}",
        )
    console.print(table)
    for why, count in result.skipped.items():
        console.print(f"left out {count}: {why}")
    if result.support is not None and result.support < 0.99:
        console.print(
            f"[yellow]support {result.support:.2f}[/yellow]: the candidate puts "
            f"{1 - result.support:.0%} of its choices on tiers the logging policy never tried "
            "there; IPS counts them as zero and DR relies on its model for them"
        )
