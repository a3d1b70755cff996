"""The Alembic migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Integer, MetaData, String, create_engine, inspect

from foveal.store import Store
from foveal.store.models import Base
from foveal.store.store import alembic_config

TABLES = {"decisions", "feedback", "tenants", "api_keys", "learned_state"}


@pytest.fixture
def migrated(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'fresh' / 'foveal.db'}"
    store = Store(url)
    store.migrate()
    store.close()
    engine = create_engine(url)
    yield engine
    engine.dispose()


def _diff(engine: Engine, metadata: MetaData) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_migrations_match_the_models(migrated: Engine) -> None:
    assert TABLES <= set(inspect(migrated).get_table_names())
    assert _diff(migrated, Base.metadata) == []


def test_the_comparison_sees_drift(migrated: Engine) -> None:
    """Guards the test above: a model change the migrations lack is reported."""
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["feedback"].append_column(Column("comment", String(200)))
    tenants = changed.tables["tenants"]
    tenants.c.max_tokens_cap.type = String(10)
    kinds = {d[0][0] if isinstance(d, list) else d[0] for d in _diff(migrated, changed)}
    assert kinds == {"add_column", "modify_type"}
    assert isinstance(Base.metadata.tables["tenants"].c.max_tokens_cap.type, Integer)


def test_single_head_and_a_clean_downgrade(migrated: Engine) -> None:
    cfg = alembic_config()
    assert len(ScriptDirectory.from_config(cfg).get_heads()) == 1
    with migrated.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert not TABLES & set(inspect(migrated).get_table_names())
    with migrated.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert _diff(migrated, Base.metadata) == []
