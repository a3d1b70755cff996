"""``foveal operator``: run the Kubernetes operator, print the CRDs it serves."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["operator_app"]

operator_app = typer.Typer(
    help="The Kubernetes operator (ModelPool, RoutingPolicy).", no_args_is_help=True
)


@operator_app.command("run")
def run(
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Namespace to serve (repeatable)."),
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Serve every namespace.")
    ] = False,
    router_metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--router-metrics",
            help="A router's /metrics URL to scale from (repeatable); none: autoscaler off.",
        ),
    ] = None,
    scale_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between autoscaler passes.")
    ] = 15.0,
    scrape_timeout: Annotated[
        float, typer.Option(min=0.1, help="Timeout of one metrics scrape, seconds.")
    ] = 2.0,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig", help="Kubeconfig file (default: in-cluster, $KUBECONFIG, ~/.kube)."
        ),
    ] = None,
    context: Annotated[str | None, typer.Option(help="Kubeconfig context.")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run the operator in the foreground until SIGINT/SIGTERM."""
    from foveal.cli.logs import configure_logging
    from foveal.operator.runner import OperatorConfig, run_operator

    if namespace and all_namespaces:
        raise typer.BadParameter("use either --namespace or --all-namespaces, not both")
    if not namespace and not all_namespaces:
        raise typer.BadParameter("name the namespaces to serve (--namespace) or --all-namespaces")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"--log-level {log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    if kubeconfig is not None and not kubeconfig.is_file():
        raise typer.BadParameter(f"--kubeconfig {kubeconfig}: no such file")
    configure_logging("text", log_level)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # kopf logs every handled watch event at INFO; the operator logs its own decisions.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(
        namespaces=tuple(namespace or ()),
        router_metrics=tuple(router_metrics or ()),
        scale_interval_s=scale_interval,
        scrape_timeout_s=scrape_timeout,
        kubeconfig=str(kubeconfig) if kubeconfig else None,
        context=context,
    )
    asyncio.run(run_operator(config))


@operator_app.command("crds")
def crds() -> None:
    """Print the CustomResourceDefinitions: foveal operator crds | kubectl apply -f -"""
    from foveal.api.crds import crds_yaml

    sys.stdout.write(crds_yaml())
