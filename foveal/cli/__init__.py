"""The `foveal` command line: the local stack, the router, API keys, config, benchmarks."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from foveal.cli.bench_routing import bench_routing
from foveal.cli.logs import configure_logging
from foveal.cli.operator import operator_app
from foveal.cli.pool import pool_app
from foveal.cli.router_evaluate import router_evaluate
from foveal.cli.router_train import bench_outcomes, router_train
from foveal.cli.vlm import vlm_app
from foveal.config import Settings, load_settings

__all__ = ["app", "main"]

app = typer.Typer(
    help="Foveal: route VLM requests to the cheapest visual-token tier.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="API keys (each maps to a tenant).", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their caps.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
router_app = typer.Typer(
    help="The router (gateway + gRPC) on configured pools.", no_args_is_help=True
)
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.add_typer(config_app, name="config")
app.add_typer(router_app, name="router")
router_app.command("evaluate")(router_evaluate)
router_app.command("train")(router_train)
app.add_typer(bench_app, name="bench")
bench_app.command("outcomes")(bench_outcomes)
bench_app.command("routing")(bench_routing)
app.add_typer(operator_app, name="operator")
app.add_typer(vlm_app, name="vlm")
app.add_typer(pool_app, name="pool")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Store URL (overrides config).")]
console = Console()


def _settings(
    config: Path | None, store: str | None = None, **sections: dict[str, Any]
) -> Settings:
    settings = load_settings(config)
    updates: dict[str, Any] = {}
    if store:
        updates["store"] = settings.store.model_copy(update={"url": store})
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            updates[name] = getattr(settings, name).model_copy(update=values)
    settings = settings.model_copy(update=updates)
    configure_logging(settings.log_format, settings.log_level)
    return settings


async def _serve_until_signal(start: Any, stop: Any) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await start()
        await done.wait()
    finally:
        console.print("stopping…")
        await stop()


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="Gateway port (0: a free one).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC router port (0: a free one).")] = None,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="Require API keys.")] = False,
    replicas: Annotated[int, typer.Option(help="Local pool replicas per tier.")] = 1,
    pools: Annotated[
        str | None,
        typer.Option(
            help="Backend of the local pools: reference (the reference VLM) or fake (a test "
            "double). Default: each tier's `backend` setting (reference)."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Reference-VLM checkpoint (default: the shipped one).")
    ] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Start the local stack: gateway + gRPC router (SQLite store) + one local pool per tier."""
    from foveal.testing.stack import LocalStack

    if pools not in (None, "reference", "fake"):
        raise typer.BadParameter(f"expected reference or fake, got {pools!r}", param_hint="--pools")
    settings = _settings(
        config,
        store,
        gateway={"port": port},
        grpc={"port": grpc_port},
        auth={"enabled": auth or None},
        local_pools={"checkpoint": str(checkpoint) if checkpoint else None},
    )
    backend: Literal["reference", "fake"] | None = None
    if pools is not None:
        backend = "fake" if pools == "fake" else "reference"
    stack = LocalStack(settings, record_requests=False, pool_backend=backend)

    async def start() -> None:
        await stack.start(replicas=replicas)
        _print_stack(stack)

    try:
        asyncio.run(_serve_until_signal(start, stack.stop))
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot start the local stack:[/red] {exc}")
        raise typer.Exit(1) from None


def _print_stack(stack: Any) -> None:
    s = stack.settings
    table = Table(title="Foveal local stack", show_header=False)
    table.add_row("OpenAI-compatible gateway", f"{stack.http_url}/v1")
    table.add_row("gRPC router (foveal.v1.Router)", stack.grpc_target)
    table.add_row("store", s.store.url)
    table.add_row(
        "auth",
        "API keys required"
        if s.auth.enabled
        else f"DISABLED (every request is tenant {s.auth.default_tenant!r})",
    )
    backends = {pools[0].backend for pools in stack.pools.values()}
    if "reference" in backends:
        table.add_row("reference VLM checkpoint", s.local_pools.checkpoint or "(shipped)")
    for tier in s.tiers:
        label = tier.backend
        if tier.name in stack.pools and stack.pools[tier.name][0].backend == "fake":
            label = "FAKE pool (test double)"
        elif tier.name in stack.pools:
            label = f"reference VLM pool ({tier.model}, {s.local_pools.mechanism})"
        urls = ", ".join(e.url for e in tier.endpoints)
        table.add_row(f"tier {tier.name} ({tier.visual_tokens} visual tokens)", f"{label}: {urls}")
    console.print(table)
    console.print(f"try: curl -s {stack.http_url}/v1/models   (Ctrl-C stops everything)")


@router_app.command("serve")
def router_serve(
    port: Annotated[int | None, typer.Option(help="Gateway port.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address of both edges.")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Serve the gateway and gRPC router over the pools named in the config."""
    from foveal.router.app import RouterApp

    settings = _settings(
        config, store, gateway={"port": port, "host": host}, grpc={"port": grpc_port, "host": host}
    )
    # With catalog.source=kubernetes the tiers and their endpoints come from the ModelPools.
    missing = [t.name for t in settings.tiers if not t.endpoints]
    if missing and settings.catalog.source == "static":
        raise typer.BadParameter(f"tiers without endpoints: {missing} (use `foveal up` locally)")
    router = RouterApp(settings)

    async def start() -> None:
        await router.start()
        console.print(f"gateway {router.http_url}  gRPC {router.grpc_target}")

    asyncio.run(_serve_until_signal(start, router.stop))


@contextmanager
def _store(config: Path | None, store: str | None) -> Iterator[Any]:
    """The configured store, migrated, closed on exit."""
    from foveal.store import Store

    db = Store(_settings(config, store).store.url)
    try:
        db.migrate()
        yield db
    finally:
        db.close()


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (created if new).")],
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    with _store(config, store) as db:
        key = db.create_api_key(tenant)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """List keys by their display prefix (the keys themselves are never stored)."""
    with _store(config, store) as db:
        rows = db.list_api_keys(tenant)
    table = Table("prefix", "tenant", "created", "revoked")
    for row in rows:
        table.add_row(row.prefix, row.tenant, str(row.created_at), "yes" if row.revoked else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: str, config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """Revoke the key with this display prefix."""
    with _store(config, store) as db:
        found = db.revoke_api_key(prefix)
    if not found:
        typer.echo(f"no key with prefix {prefix!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {prefix}")


@tenants_app.command("set-cap")
def tenants_set_cap(
    name: str,
    max_tokens: Annotated[
        int | None, typer.Option(help="Cap on max_tokens; omit to clear.")
    ] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Set (or clear) a tenant's `max_tokens` cap."""
    with _store(config, store) as db:
        rec = db.set_tenant_cap(name, max_tokens)  # creates the tenant if new
    typer.echo(f"{rec.name}: max_tokens cap {rec.max_tokens_cap or 'default'}")


@config_app.command("schema")
def config_schema() -> None:
    """Print the settings' JSON schema (every field is documented)."""
    typer.echo(json.dumps(Settings.model_json_schema(), indent=2))


@config_app.command("docs")
def config_docs() -> None:
    """Print the Markdown settings reference (docs/configuration-reference.md)."""
    from foveal.config_docs import render_reference

    typer.echo(render_reference(), nl=False)


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective settings (file + environment) as JSON."""
    typer.echo(load_settings(config).model_dump_json(indent=2))


@app.command("migrate")
def migrate(config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """Create or upgrade the store's tables (Alembic)."""
    with _store(config, store):
        pass
    typer.echo("store is at the latest migration")


@bench_app.command("overhead")
def bench_overhead(
    requests: Annotated[int, typer.Option(help="Requests per measurement.")] = 2000,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here.")] = None,
    decision_only: Annotated[
        bool, typer.Option(help="Only the in-process decision overhead (no servers).")
    ] = False,
) -> None:
    """Gateway-added latency and throughput against a fast fake pool, and the router's
    decision overhead (features + sufficiency model + bandit) for a 1024x1024 JPEG."""
    from foveal.bench.decision import as_json, print_decision, run_decision
    from foveal.bench.overhead import run_overhead

    configure_logging("text", "WARNING")
    runs = [] if decision_only else run_overhead(requests=requests, out=None, console=console)
    decision = run_decision(requests=min(requests, 2000))
    print_decision(decision, console)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"gateway": [asdict(r) for r in runs], "decision": as_json(decision)}
        out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {out}")


@bench_app.command("operator")
def bench_operator(
    repetitions: Annotated[int, typer.Option(min=1, help="Repetitions of each measurement.")] = 10,
    scale_interval: Annotated[
        float, typer.Option(min=0.1, help="The operator's --scale-interval, seconds.")
    ] = 1.0,
    idle_seconds: Annotated[
        int, typer.Option(min=0, help="idleSecondsToZero of the cold tier.")
    ] = 3,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here.")] = None,
) -> None:
    """Operator reconcile latency and scaling reaction time on a local Kubernetes cluster."""
    from foveal.bench.kube import run_operator_bench

    configure_logging("text", "WARNING")
    run_operator_bench(
        repetitions=repetitions,
        scale_interval_s=scale_interval,
        idle_seconds=idle_seconds,
        out=out,
        console=console,
    )


@bench_app.command("tiers")
def bench_tiers(
    out: Annotated[Path, typer.Option(help="Folder for tiers.json and tiers.png.")] = Path(
        "bench-out"
    ),
    dataset: Annotated[
        Path | None,
        typer.Option(help="Dataset in the suite's JSONL format (file or folder with test.jsonl)."),
    ] = None,
    per_family: Annotated[
        int, typer.Option(min=1, help="Test-split samples per family (without --dataset).")
    ] = 100,
    requests: Annotated[
        int, typer.Option(min=0, help="Requests per speed measurement (0: skip the speed runs).")
    ] = 100,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Reference-VLM checkpoint (default: the shipped one).")
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=1, help="torch threads of each measured pool server (the local stack runs 1)."
        ),
    ] = 1,
) -> None:
    """Accuracy per family x tier x mechanism, ms/request, req/s and FLOPs per tier."""
    from foveal.bench.tiers import run_tiers

    configure_logging("text", "WARNING")
    run_tiers(
        out,
        dataset=dataset,
        per_family=per_family,
        requests=requests,
        checkpoint=checkpoint,
        threads=threads,
        console=console,
    )


@bench_app.command("suite")
def bench_suite(
    out: Annotated[Path, typer.Option(help="Folder to write train/validation/test JSONL into.")],
    train: Annotated[int, typer.Option(min=0, help="Training samples.")] = 7000,
    validation: Annotated[int, typer.Option(min=0, help="Validation samples.")] = 700,
    test: Annotated[int, typer.Option(min=0, help="Test samples.")] = 700,
    seed: Annotated[int, typer.Option(help="Offset added to every split's seed.")] = 0,
    embed: Annotated[
        bool, typer.Option(help="Embed images as data URIs instead of PNG files.")
    ] = False,
) -> None:
    """Write the visual-QA suite's splits in the dataset format (docs/dataset-format.md)."""
    from foveal.bench.suite import write_splits

    paths = write_splits(out, n_train=train, n_val=validation, n_test=test, seed=seed, embed=embed)
    for split, path in paths.items():
        console.print(f"{split}: {path}")


def main() -> None:
    app()
