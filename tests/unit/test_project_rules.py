"""Project rules that keep the codebase honest: import layers, generated docs, module size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from foveal.config_docs import render_reference

ROOT = Path(__file__).resolve().parents[2]


def test_import_layers_hold() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:]


def test_configuration_reference_is_current() -> None:
    committed = (ROOT / "docs" / "configuration-reference.md").read_text()
    assert committed == render_reference(), (
        "docs/configuration-reference.md is stale: "
        "run `foveal config docs > docs/configuration-reference.md`"
    )


def test_modules_stay_small() -> None:
    too_big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in (ROOT / "foveal").rglob("*.py")
        if "api/v1" not in p.as_posix() and (n := len(p.read_text().splitlines())) > 800
    ]
    assert not too_big, too_big
