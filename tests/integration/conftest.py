"""Store fixtures: every store test runs against SQLite and against a real PostgreSQL.

PostgreSQL comes from ``FOVEAL_TEST_POSTGRES_URL`` (a server where the user may create
databases) or from a throwaway server this session starts (``foveal.testing.postgres``).
Without server binaries the PostgreSQL cases are skipped, except under ``CI=true``, where
they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from foveal.store import Store
from foveal.testing.postgres import PostgresNotFound, PostgresServer, find_postgres_bin

_URL_ENV = "FOVEAL_TEST_POSTGRES_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _missing_postgres(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL must be installed for these tests)")
    pytest.skip(f"{reason}; install the `postgresql` package or set {_URL_ENV}")


def _started_server(database: str) -> Iterator[PostgresServer]:
    if find_postgres_bin() is None:
        _missing_postgres("PostgreSQL server binaries (initdb, pg_ctl) not found")
    try:
        server = PostgresServer(database=database)
    except PostgresNotFound as exc:
        _missing_postgres(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway local PostgreSQL server shared by the session (needs the server binaries)."""
    yield from _started_server("foveal")


@pytest.fixture
def fresh_postgres_server() -> Iterator[PostgresServer]:
    """A throwaway local PostgreSQL server of one test's own, which it may stop and restart."""
    yield from _started_server("foveal")


@pytest.fixture(scope="session")
def postgres_base_url(request: pytest.FixtureRequest) -> str:
    """URL of a PostgreSQL server to create test databases on."""
    url = os.environ.get(_URL_ENV)
    if url:
        return url
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.url


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A fresh, empty database of its own for one test."""
    base = make_url(postgres_base_url)
    name = f"foveal_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database (not migrated): a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'foveal.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A migrated Store on ``store_url``."""
    s = Store(store_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()
