"""The operator's kopf registry never makes kopf put a finalizer on a ModelPool.

A finalizer on a ModelPool means it cannot be deleted while the operator is down or has lost
its RBAC (``helm uninstall`` removes the operator's Role in the same pass as the ModelPools).
kopf adds its finalizer for timers, daemons and non-optional ``on.delete`` handlers, so the
autoscaler is a loop over a kopf index instead; ``tests/e2e/test_helm_install.py`` checks the
uninstall itself.
"""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from foveal.operator import status as st
from foveal.operator.handlers import Operator, OperatorConfig, _check_no_finalizers, build_registry


@pytest.mark.parametrize("metrics", [(), ("http://127.0.0.1:9/metrics",)])
def test_no_handler_needs_a_finalizer(metrics: tuple[str, ...]) -> None:
    registry = build_registry(Operator(OperatorConfig(router_metrics=metrics)))
    handlers = [
        *registry._spawning.get_all_handlers(),
        *registry._changing.get_all_handlers(),
    ]
    assert handlers, "the reconcile handlers are registered"
    assert [h.id for h in handlers if h.requires_finalizer] == []
    assert list(registry._spawning.get_all_handlers()) == []  # no timer, no daemon
    # The autoscaler iterates an index of ModelPools.
    assert [h.id for h in registry._indexing.get_all_handlers()] == ["modelpools"]


def test_a_handler_that_needs_a_finalizer_is_refused() -> None:
    registry = kopf.OperatorRegistry()

    @kopf.timer("foveal.io", "v1alpha1", "modelpools", id="tick", interval=1, registry=registry)
    def tick(**_: Any) -> None:
        pass

    with pytest.raises(RuntimeError, match="need a finalizer.*tick"):
        _check_no_finalizers(registry)

    optional = kopf.OperatorRegistry()

    @kopf.on.delete("foveal.io", "v1alpha1", "modelpools", optional=True, registry=optional)
    def gone(**_: Any) -> None:
        pass

    _check_no_finalizers(optional)  # an optional delete handler blocks nothing

    @kopf.on.delete("foveal.io", "v1alpha1", "modelpools", id="blocking", registry=optional)
    def blocking(**_: Any) -> None:
        pass

    with pytest.raises(RuntimeError, match="blocking"):
        _check_no_finalizers(optional)


def test_scaling_event_names_the_pool() -> None:
    meta = {"name": "t16", "namespace": "demo", "uid": "u-1", "resourceVersion": "42"}
    event = st.pool_event(
        meta, reason="Wake", message="wake 0 -> 1", now="2026-11-21T10:00:00Z",
        component="foveal-operator",
    )  # fmt: skip
    assert event["metadata"] == {"generateName": "t16.", "namespace": "demo"}
    assert event["involvedObject"] == {
        "apiVersion": "foveal.io/v1alpha1",
        "kind": "ModelPool",
        "name": "t16",
        "namespace": "demo",
        "uid": "u-1",
        "resourceVersion": "42",
    }
    assert (event["type"], event["reason"], event["message"]) == ("Normal", "Wake", "wake 0 -> 1")
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-11-21T10:00:00Z"
    assert event["source"] == {"component": "foveal-operator"}
    long = st.pool_event(meta, reason="ScaleUp", message="x" * 5000, now="T", component="c")
    assert len(long["message"]) == 1024
