"""Regenerate the checked-in gRPC stubs under ``foveal/api/v1/`` from ``proto/``.

    python -m foveal.api.generate           # rewrite the stubs (``make proto``)
    python -m foveal.api.generate --check   # exit 1 listing the stubs that would change

Only the pinned grpcio-tools may generate: another version writes different code (and a
different runtime-version guard), so the drift check would flap between machines.

``proto/foveal/v1/x.proto`` declares ``package foveal.v1`` and protoc names its imports after
the proto path (``from foveal.v1 import x_pb2``); the stubs live in ``foveal.api.v1``, so the
generator compiles into a scratch tree and rewrites those import lines. The descriptors keep
their proto path (``foveal/v1/x.proto``), which is what reflection clients see.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

__all__ = ["PINNED_GRPCIO_TOOLS", "GenerationError", "check", "generate", "main", "write"]

PINNED_GRPCIO_TOOLS = "1.85.1"  # keep equal to the pin in constraints.txt and pyproject.toml

_REPO_ROOT = Path(__file__).resolve().parents[2]
_PROTO_PACKAGE = ("foveal", "v1")  # directory of the .proto files under proto/
_STUB_PACKAGE = "foveal.api.v1"  # where the generated modules are imported from
_STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_IMPORT_LINE = re.compile(r"^from foveal\.v1 import ", re.MULTILINE)


class GenerationError(Exception):
    """The stubs cannot be generated here (wrong tool version, protoc failure, no protos)."""


def _check_tools_version() -> None:
    try:
        found = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        raise GenerationError(
            f"grpcio-tools is not installed; install grpcio-tools=={PINNED_GRPCIO_TOOLS} "
            "(`make venv` does, from constraints.txt)"
        ) from None
    if found != PINNED_GRPCIO_TOOLS:
        raise GenerationError(
            f"grpcio-tools {found} is installed, but the stubs are generated with "
            f"grpcio-tools=={PINNED_GRPCIO_TOOLS} (the pin in constraints.txt); "
            f"install it: pip install grpcio-tools=={PINNED_GRPCIO_TOOLS}"
        )


def _is_stub(name: str) -> bool:
    return name.endswith(_STUB_SUFFIXES)


def generate(proto_root: Path) -> dict[str, bytes]:
    """Compile every ``proto_root/foveal/v1/*.proto``; returns stub file name -> content."""
    _check_tools_version()
    from grpc_tools import protoc  # imported late: only the pinned version may run

    proto_dir = proto_root.joinpath(*_PROTO_PACKAGE)
    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise GenerationError(f"no .proto files under {proto_dir}")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="foveal-proto-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise GenerationError("protoc failed (its messages are above)")
        out_dir = Path(tmp).joinpath(*_PROTO_PACKAGE)
        stubs: dict[str, bytes] = {}
        for path in sorted(out_dir.iterdir()):
            if not _is_stub(path.name):
                continue
            text = path.read_text(encoding="utf-8")
            stubs[path.name] = _IMPORT_LINE.sub(f"from {_STUB_PACKAGE} import ", text).encode()
    return stubs


def _diff(stubs: dict[str, bytes], dest: Path) -> list[tuple[str, str]]:
    """(file name, what is wrong) for every stub in ``dest`` that differs from ``stubs``."""
    problems: list[tuple[str, str]] = []
    for name, content in stubs.items():
        path = dest / name
        if not path.exists():
            problems.append((name, "missing"))
        elif path.read_bytes() != content:
            problems.append((name, "differs"))
    if dest.is_dir():
        for path in sorted(dest.iterdir()):
            if _is_stub(path.name) and path.name not in stubs:
                problems.append((path.name, "stale (no .proto generates it)"))
    return problems


def write(stubs: dict[str, bytes], dest: Path) -> list[str]:
    """Bring ``dest`` in line with ``stubs``; returns the names written or removed."""
    changed = []
    dest.mkdir(parents=True, exist_ok=True)
    for name, problem in _diff(stubs, dest):
        if name in stubs:
            (dest / name).write_bytes(stubs[name])
        else:
            (dest / name).unlink()
        changed.append(f"{name} ({problem})")
    return changed


def check(stubs: dict[str, bytes], dest: Path) -> list[str]:
    """The stubs in ``dest`` that regeneration would change, as ``name: problem`` lines."""
    return [f"{name}: {problem}" for name, problem in _diff(stubs, dest)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m foveal.api.generate",
        description="Regenerate foveal/api/v1 stubs from proto/ with the pinned grpcio-tools.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="Change nothing; exit 1 listing the stubs that regeneration would change.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=_REPO_ROOT,
        help="Repository root holding proto/ and foveal/api/v1/ (default: this checkout).",
    )
    args = parser.parse_args(argv)
    dest = args.root / "foveal" / "api" / "v1"
    try:
        stubs = generate(args.root / "proto")
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rel = dest.relative_to(args.root).as_posix() if dest.is_relative_to(args.root) else dest
    if args.check:
        problems = check(stubs, dest)
        if problems:
            print("gRPC stubs are out of date with proto/:", file=sys.stderr)
            for line in problems:
                print(f"  {rel}/{line}", file=sys.stderr)
            print("run `make proto` and commit the result", file=sys.stderr)
            return 1
        print(f"{rel}: up to date ({len(stubs)} files)")
        return 0
    changed = write(stubs, dest)
    for line in changed:
        print(f"wrote {rel}/{line}")
    if not changed:
        print(f"{rel}: up to date ({len(stubs)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
