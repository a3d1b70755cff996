"""The checked-in gRPC stubs are exactly what proto/ generates with the pinned grpcio-tools."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from foveal.api import generate

ROOT = Path(__file__).resolve().parents[2]


def test_regeneration_changes_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "foveal.api.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"stubs drifted from proto/ (run `make proto`):\n{proc.stderr}"


def test_check_reports_a_drifted_stub(tmp_path: Path) -> None:
    (tmp_path / "proto").symlink_to(ROOT / "proto")
    stubs = tmp_path / "foveal" / "api" / "v1"
    stubs.mkdir(parents=True)
    for path in (ROOT / "foveal" / "api" / "v1").glob("router_pb2*"):
        (stubs / path.name).write_bytes(path.read_bytes())
    (stubs / "router_pb2.py").write_text("# edited by hand\n")
    (stubs / "old_pb2.py").write_text("# left over from a deleted proto\n")

    proc = subprocess.run(
        [sys.executable, "-m", "foveal.api.generate", "--check", "--root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "router_pb2.py: differs" in proc.stderr
    assert "old_pb2.py: stale" in proc.stderr
    assert "router_pb2_grpc.py" not in proc.stderr
    assert (stubs / "router_pb2.py").read_text() == "# edited by hand\n"  # --check writes nothing


def test_generated_imports_point_into_the_package() -> None:
    for path in (ROOT / "foveal" / "api" / "v1").glob("*_pb2*.py*"):
        text = path.read_text()
        assert not re.search(r"^from foveal\.v1 ", text, re.MULTILINE), path.name
    grpc_stub = (ROOT / "foveal" / "api" / "v1" / "router_pb2_grpc.py").read_text()
    assert "from foveal.api.v1 import router_pb2 " in grpc_stub


def test_runtime_version_guards_pass() -> None:
    # Each stub checks at import time that the installed protobuf / grpcio runtimes are new
    # enough for the code generated; a fresh interpreter makes the check really run.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from foveal.api.v1 import router_pb2, router_pb2_grpc; "
            "print(router_pb2.DESCRIPTOR.name, router_pb2_grpc.GRPC_GENERATED_VERSION)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["foveal/v1/router.proto", generate.PINNED_GRPCIO_TOOLS]


def test_pin_matches_the_constraints_file() -> None:
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"grpcio-tools=={generate.PINNED_GRPCIO_TOOLS}" in constraints.split()


def test_refuses_another_grpcio_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate.metadata, "version", lambda name: "1.0.0")
    with pytest.raises(generate.GenerationError, match=r"1\.0\.0 is installed.*==1\.85\.1"):
        generate.generate(ROOT / "proto")
