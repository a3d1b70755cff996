"""End-to-end fixtures: a real Kubernetes control plane (etcd, kube-apiserver 1.20,
kube-controller-manager) on loopback, shared by the test session (``foveal.testing.kube``).

The binaries come from ``scripts/k8s-build.sh`` (``make test`` runs it). Without them the tests
here are skipped, except under ``CI=true``, where they fail. Every test in this directory is
marked ``e2e`` (``pytest -m "not e2e"`` leaves them out). Tests share the cluster, so each works
in a namespace of its own (the ``kube_namespace`` fixture, or ``kube.create_namespace()``)
and names cluster-wide objects uniquely.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from foveal.testing.kube import KubeCluster, find_kube_bin, k8s_cache_dir

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _missing_kube(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: the end-to-end tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kube_bin_dir() -> Path:
    """Where the control-plane binaries are (skips, or fails under CI=true, without them)."""
    found = find_kube_bin()
    if found is None:
        _missing_kube(
            f"etcd/kube-apiserver/kube-controller-manager not built in {k8s_cache_dir() / 'bin'}; "
            "run scripts/k8s-build.sh"
        )
    return found


@pytest.fixture(scope="session")
def kube(kube_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """The session's control plane. Its files (kubeconfig, logs: ``kube.logs``) stay in
    pytest's temporary directory for debugging after the run."""
    cluster = KubeCluster(tmp_path_factory.mktemp("kube"), bin_dir=kube_bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def kube_namespace(kube: KubeCluster) -> str:
    """A fresh namespace of one test's own in the session's cluster."""
    return kube.create_namespace("t")
