"""The `foveal` command as a user runs it: `up` starts and stops the stack, `keys` manages keys."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from foveal.store import Store


def _foveal(*args: str, cwd: Path, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("FOVEAL_CONFIG", None)
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "foveal", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def test_up_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc = _foveal(
        "up", "--port", "0", "--grpc-port", "0", "--auth", "--pools", "fake", cwd=tmp_path
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        gateway = re.search(r"(http://127\.0\.0\.1:\d+)/v1", out)
        assert gateway, out
        assert "FAKE pool" in out and "API keys required" in out
        pools = re.findall(r"FAKE pool \(test double\):\s*(http://127\.0\.0\.1:\d+)", out)
        assert len(pools) == 5, out
        key_proc = subprocess.run(
            [sys.executable, "-m", "foveal", "keys", "create", "--tenant", "acme"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        key = key_proc.stdout.strip().splitlines()[-1]
        assert key.startswith("fvl_")
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(
            f"{gateway.group(1)}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["x-foveal-tier"] == "t1"
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    # every port it opened is closed again
    for url in [gateway.group(1), *pools]:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
        except OSError:
            continue
        raise AssertionError(f"{url} still answers after Ctrl-C")
    # the key's hash, not the key, is in the store
    store = Store(f"sqlite:///{tmp_path / 'foveal.db'}")
    try:
        assert store.tenant_for_key(key).name == "acme"  # type: ignore[union-attr]
    finally:
        store.close()
    assert key not in (tmp_path / "foveal.db").read_bytes().decode("latin-1")


def test_keys_list_and_revoke(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "foveal", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )

    key = run("keys", "create", "--tenant", "globex").stdout.strip().splitlines()[-1]
    prefix = key[len("fvl_") :][:8]
    listed = run("keys", "list")
    assert prefix in listed.stdout and "globex" in listed.stdout
    assert run("keys", "revoke", prefix).returncode == 0
    missing = run("keys", "revoke", "nosuchkey")
    assert missing.returncode == 1 and "no key" in missing.stderr
