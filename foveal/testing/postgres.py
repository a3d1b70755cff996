"""A throwaway PostgreSQL server on loopback, for tests and local experiments.

It needs the server binaries (``initdb``, ``pg_ctl``, ``postgres``; Debian/Ubuntu package
``postgresql``). As root it runs them as the ``postgres`` system user, since initdb refuses root.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PostgresNotFound", "PostgresServer", "find_postgres_bin", "running_postgres"]

log = logging.getLogger(__name__)

_TOOLS = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "postgres"


class PostgresNotFound(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: from PATH, else the newest
    ``/usr/lib/postgresql/*/bin``; None when there is none."""
    found = shutil.which("pg_ctl")
    candidates = [str(Path(found).resolve().parent)] if found else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for cand in candidates:
        if all(os.access(Path(cand, tool), os.X_OK) for tool in _TOOLS):
            return Path(cand)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.

    ``start`` creates the cluster on first use and may be called again after ``stop`` (same
    port, same data); ``remove`` stops it and deletes its directory.
    """

    def __init__(self, *, database: str = "foveal", bindir: Path | None = None) -> None:
        found = bindir or find_postgres_bin()
        if found is None:
            raise PostgresNotFound(
                "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                "/usr/lib/postgresql/*/bin; install the `postgresql` package"
            )
        self.bindir = found
        self.database = database
        self.port = 0
        self._root: Path | None = None
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotFound(
                    "running as root, and there is no `postgres` user to run initdb as"
                ) from None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database."""
        return f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{self.port}/{self.database}"

    @property
    def data_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("the server was never started")
        return self._root / "data"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError, RuntimeError):
            return None

    def start(self) -> str:
        """Start the server (creating the cluster and database the first time); returns url."""
        first = self._root is None
        if first:
            self._init_cluster()
            self.port = _free_port()
        assert self._root is not None
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._root} "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self._root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        log.info("postgres up on 127.0.0.1:%d (pid %s)", self.port, self.pid)
        if first:
            self._run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", _SUPERUSER,
                self.database, tool_dir=self._client_bin(),
            )  # fmt: skip
        return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown), keeping its data."""
        pid = self.pid
        if pid is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop")
        except (subprocess.SubprocessError, OSError) as exc:
            log.warning("pg_ctl stop failed (%s); sending SIGQUIT to pid %d", exc, pid)
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        if self._root is None:
            return
        try:
            self.stop()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def server_log(self) -> str:
        try:
            return (self.data_dir.parent / "server.log").read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    # ---- internals ---------------------------------------------------------------------------

    def _init_cluster(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="foveal-pg-"))
        if self._user is not None:
            os.chown(self._root, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", _SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip

    def _client_bin(self) -> Path:
        if (self.bindir / "createdb").exists():
            return self.bindir
        found = shutil.which("createdb")
        if found is None:
            raise PostgresNotFound("`createdb` not found next to pg_ctl or on PATH")
        return Path(found).parent

    def _run(self, tool: str, *args: str, tool_dir: Path | None = None) -> None:
        cmd = [str((tool_dir or self.bindir) / tool), *args]
        as_postgres = self._user is not None
        proc = subprocess.run(
            cmd,
            cwd=self._root or tempfile.gettempdir(),  # a directory the postgres user can enter
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            env={**os.environ, "LC_ALL": "C"},
            user=self._user.pw_uid if self._user else None,
            group=self._user.pw_gid if self._user else None,
            extra_groups=[] if as_postgres else None,
        )
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(
                proc.returncode, cmd, output=f"{proc.stdout}\n{self.server_log()}"
            )


@contextmanager
def running_postgres(*, database: str = "foveal") -> Iterator[str]:
    """Run a throwaway server for the ``with`` block; yields the SQLAlchemy URL of ``database``.

    Raises PostgresNotFound when the server binaries are missing.
    """
    server = PostgresServer(database=database)
    try:
        yield server.start()
    finally:
        server.remove()
