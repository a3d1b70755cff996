"""Run the operator: in the foreground (the CLI) or in a background thread (tests, e2e).

kopf runs in-process on its own registry (:func:`handlers.build_registry`), standalone (no
peering objects, so no extra RBAC and no wait for peers) and with its bookkeeping in
``foveal.io/*`` annotations rather than in ``status`` (the CRD's structural schema would prune
unknown status fields anyway). In the main thread kopf stops cleanly on SIGINT/SIGTERM.

    from foveal.operator.runner import OperatorConfig, run_operator_in_thread

    with run_operator_in_thread(OperatorConfig(namespaces=("demo",), kubeconfig=path)) as op:
        ...  # create ModelPools; op.operator is the runtime (tracker, scaling states)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import kopf

from foveal.operator.handlers import Operator, OperatorConfig, build_registry

__all__ = [
    "OperatorConfig",
    "OperatorThread",
    "configure_settings",
    "run_operator",
    "run_operator_in_thread",
]

log = logging.getLogger(__name__)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.scanning.disabled = True  # no cluster-wide CRD/namespace watches (least RBAC)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="foveal.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="foveal.io", key="last-handled-configuration"
    )
    # No handler needs a finalizer (see handlers.py); kopf still removes this one from
    # ModelPools that an older operator version gave it.
    settings.persistence.finalizer = "foveal.io/operator"
    settings.posting.level = logging.WARNING  # events for problems; explicit ones for scaling
    settings.watching.server_timeout = 300  # re-list every 5 min as a safety net
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


async def run_operator(
    config: OperatorConfig,
    *,
    operator: Operator | None = None,
    stop_flag: asyncio.Event | asyncio.Future[object] | threading.Event | None = None,
    ready_flag: asyncio.Event | asyncio.Future[object] | threading.Event | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or SIGINT/SIGTERM when in the main thread)."""
    operator = operator or Operator(config)
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    await kopf.operator(
        registry=build_registry(operator),
        settings=settings,
        standalone=True,
        clusterwide=config.clusterwide,
        namespaces=list(config.namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


@dataclass
class OperatorThread:
    """A running operator in a daemon thread; :meth:`stop` ends it and joins the thread."""

    operator: Operator
    thread: threading.Thread
    stop_flag: threading.Event
    error: list[BaseException]

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stop_flag.set()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"the operator thread did not stop within {timeout_s}s")


@contextmanager
def run_operator_in_thread(
    config: OperatorConfig, *, ready_timeout_s: float = 60.0
) -> Iterator[OperatorThread]:
    """Start the operator in a thread, wait until kopf is ready, stop it on exit."""
    operator = Operator(config)
    stop_flag, ready_flag = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(
                run_operator(config, operator=operator, stop_flag=stop_flag, ready_flag=ready_flag)
            )
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)
            ready_flag.set()

    thread = threading.Thread(target=main, name="foveal-operator", daemon=True)
    thread.start()
    handle = OperatorThread(operator, thread, stop_flag, errors)
    try:
        if not ready_flag.wait(ready_timeout_s):
            raise RuntimeError(f"the operator was not ready within {ready_timeout_s}s")
        if errors:
            raise RuntimeError(f"the operator failed to start: {errors[0]!r}") from errors[0]
        yield handle
    finally:
        handle.stop()
