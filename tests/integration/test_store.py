"""The store and the decision writer against real databases (SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from foveal.errors import Conflict, RateLimited
from foveal.store import DecisionRecord, DecisionWriter, FeedbackRecord, Store
from foveal.store.models import Base
from foveal.store.store import alembic_config
from foveal.testing.postgres import PostgresServer

TABLES = {"decisions", "feedback", "tenants", "api_keys", "learned_state"}


def _decision(request_id: str, **changes: Any) -> DecisionRecord:
    rec = DecisionRecord(
        request_id=request_id,
        tenant="acme",
        tier="t4",
        chosen_tier="t4",
        requested_model="auto",
        policy="rules",
        reason="default tier",
        propensity=1.0,
    )
    return dataclasses.replace(rec, **changes)


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released together; each result or raised exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


async def _until(done: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``done`` (the writer works on its own schedule) until true or ``timeout_s``."""
    for _ in range(int(timeout_s / 0.02)):
        if done():
            return
        await asyncio.sleep(0.02)


def _stores(url: str, n: int) -> list[Store]:
    return [Store(url) for _ in range(n)]


def _sql(url: str, statement: str) -> list[Sequence[Any]]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement))
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


# ---- schema ------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_keeps_data(store_url: str) -> None:
    first = Store(store_url)
    first.migrate()
    first.add_decisions([_decision("kept")])
    first.migrate()
    second = Store(store_url)
    second.migrate()
    try:
        assert second.count_decisions() == 1
        engine = create_engine(store_url)
        try:
            assert TABLES <= set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert _sql(store_url, "SELECT version_num FROM alembic_version") == [(head,)]
    finally:
        first.close()
        second.close()


def test_migrated_schema_matches_the_models(store: Store) -> None:
    engine = create_engine(store.url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


# ---- decisions and feedback -----------------------------------------------------------------


def test_decision_round_trip_keeps_every_field(store: Store) -> None:
    rec = DecisionRecord(
        request_id="req-1",
        tenant="acme",
        tier="t16",
        chosen_tier="t4",
        requested_model="auto",
        policy="rules",
        reason="keyword 'chart' → high tier",
        propensity=0.25,
        features={"pixels": [307200, 16], "prompt": "Ünïcödé ✓", "flags": {"ok": True, "x": None}},
        predicted={"t1": 0.125, "t16": 0.875},
        outcome="error",
        error="PoolTimeout: too slow",
        latency_ms=12.5,
        pool_latency_ms=10.25,
        cost=16.0,
        prompt_tokens=123,
        completion_tokens=45,
        edge="grpc",
        created_at=datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=timezone(timedelta(hours=2))),
    )
    for f in dataclasses.fields(DecisionRecord):  # the record really exercises every field
        default = f.default_factory() if callable(f.default_factory) else f.default
        assert getattr(rec, f.name) != default, f.name
    store.add_decisions([rec])
    got = store.get_decision("req-1")
    assert got == rec
    assert got is not None and got.created_at is not None
    assert got.created_at.utcoffset() == timedelta(0)
    assert store.get_decision("nope") is None


def test_decision_without_timestamp_gets_now_in_utc(store: Store) -> None:
    before = datetime.now(UTC)
    store.add_decisions([_decision("r")])
    got = store.get_decision("r")
    assert got is not None and got.created_at is not None
    assert got.created_at.tzinfo is not None
    slack = timedelta(seconds=1)
    assert before - slack <= got.created_at <= datetime.now(UTC) + slack
    assert dataclasses.replace(got, created_at=None) == _decision("r")


def test_add_decisions_is_one_transaction(store: Store) -> None:
    store.add_decisions([_decision("a")])
    with pytest.raises(Conflict):
        store.add_decisions([_decision("b"), _decision("a", reason="again")])
    assert store.get_decision("b") is None
    assert store.count_decisions() == 1
    assert store.get_decision("a") == dataclasses.replace(
        _decision("a"),
        created_at=store.get_decision("a").created_at,  # type: ignore[union-attr]
    )


def test_feedback_is_committed_when_add_returns(store: Store) -> None:
    rec = FeedbackRecord("req-1", "acme", 0.75, datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
    store.add_feedback(rec)
    other = Store(store.url)  # a second engine: sees only what was committed
    try:
        assert other.get_feedback("req-1") == rec
        assert other.get_feedback("req-2") is None
    finally:
        other.close()


def test_second_feedback_for_a_request_conflicts(store: Store) -> None:
    store.add_feedback(FeedbackRecord("req-1", "acme", 1.0))
    with pytest.raises(Conflict) as err:
        store.add_feedback(FeedbackRecord("req-1", "acme", 0.0))
    assert err.value.http_status == 409
    got = store.get_feedback("req-1")
    assert got is not None and got.score == 1.0
    assert got.created_at is not None and got.created_at.tzinfo is not None


def test_racing_feedback_has_exactly_one_winner(store: Store) -> None:
    stores = _stores(store.url, 8)  # as many replicas, each with its own engine
    try:
        results = _race(8, lambda i: stores[i].add_feedback(FeedbackRecord("r", "t", i / 10)))
    finally:
        for s in stores:
            s.close()
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for r in results if r is not None), results
    got = store.get_feedback("r")
    assert got is not None and got.score == winners[0] / 10


# ---- tenants and API keys ------------------------------------------------------------------


def test_tenants_get_or_create_and_caps(store: Store) -> None:
    assert store.get_tenant("acme") is None
    created = store.ensure_tenant("acme", max_tokens_cap=512)
    assert created.name == "acme" and created.max_tokens_cap == 512
    assert created.created_at.tzinfo is not None
    again = store.ensure_tenant("acme", max_tokens_cap=9)  # get: the cap is not changed
    assert again == created
    assert store.set_tenant_cap("acme", 100).max_tokens_cap == 100
    assert store.set_tenant_cap("acme", None).max_tokens_cap is None
    assert store.get_tenant("acme") == dataclasses.replace(created, max_tokens_cap=None)
    assert store.set_tenant_cap("new", 64).max_tokens_cap == 64


def test_racing_ensure_tenant_creates_one_tenant(store: Store) -> None:
    stores = _stores(store.url, 8)
    try:
        results = _race(8, lambda i: stores[i].ensure_tenant("acme", max_tokens_cap=i))
    finally:
        for s in stores:
            s.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(set(results)) == 1  # every caller got the same row
    assert _sql(store.url, "SELECT count(*) FROM tenants") == [(1,)]


def test_api_keys_are_stored_hashed_and_can_be_revoked(store: Store) -> None:
    key = store.create_api_key("acme")
    assert key.startswith("fvl_") and len(key) == 4 + 43
    assert store.get_tenant("acme") is not None  # created on the way
    tenant = store.tenant_for_key(key)
    assert tenant is not None and tenant.name == "acme"

    for table in sorted(TABLES):  # the plaintext is nowhere in the database
        for row in _sql(store.url, f"SELECT * FROM {table}"):
            assert not any(key[4:] in str(v) for v in row), (table, row)
    assert _sql(store.url, "SELECT key_hash FROM api_keys") == [
        (hashlib.sha256(key.encode()).hexdigest(),)
    ]

    [info] = store.list_api_keys("acme")
    assert (info.prefix, info.tenant, info.revoked) == (key[4:12], "acme", False)
    assert store.tenant_for_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.tenant_for_key("fvl_unknown") is None

    other = store.create_api_key("acme")
    assert other != key
    assert store.revoke_api_key(info.prefix) is True
    assert store.tenant_for_key(key) is None
    assert store.revoke_api_key(info.prefix) is False  # already revoked
    assert store.revoke_api_key("nosuchpx") is False
    assert store.tenant_for_key(other) is not None  # the tenant's other key still works
    assert [(k.prefix, k.revoked) for k in store.list_api_keys()] == [
        (key[4:12], True),
        (other[4:12], False),
    ]
    store.create_api_key("globex")
    assert [k.tenant for k in store.list_api_keys("globex")] == ["globex"]


def test_sqlite_connections_are_durable_and_enforce_foreign_keys(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'deep' / 'er' / 'foveal.db'}"
    store = Store(url)
    store.migrate()  # creates the parent directories
    try:
        with store._engine.connect() as conn:
            pragma = {
                p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert pragma == {
            "journal_mode": "wal",
            "synchronous": 2,
            "busy_timeout": 5000,
            "foreign_keys": 1,
        }
    finally:
        store.close()


# ---- the decision writer -------------------------------------------------------------------


class CountingStore(Store):
    """A real store that also records each batch it is asked to write, and from where."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[int] = []
        self.threads: set[int] = set()

    def add_decisions(self, records: Sequence[DecisionRecord]) -> None:
        self.threads.add(threading.get_ident())
        super().add_decisions(records)
        self.batches.append(len(records))


@pytest.fixture
def counting(store: Store) -> Iterator[CountingStore]:
    s = CountingStore(store.url)
    yield s
    s.close()


async def test_writer_batches_many_submits_off_the_loop(counting: CountingStore) -> None:
    written = _metric("foveal_store_decisions_written_total")
    writer = DecisionWriter(counting, interval_s=0.05, batch_max=100)
    await writer.start()
    for i in range(1000):
        writer.submit(_decision(f"r{i}"))
    await writer.flush()
    assert sum(counting.batches) == 1000 and max(counting.batches) <= 100
    assert len(counting.batches) <= 12
    assert threading.get_ident() not in counting.threads
    assert counting.count_decisions() == 1000
    assert _metric("foveal_store_decisions_written_total") - written == 1000
    await writer.close()


async def test_writer_gathers_submits_within_an_interval(counting: CountingStore) -> None:
    writer = DecisionWriter(counting, interval_s=0.3)
    await writer.start()
    for i in range(10):
        writer.submit(_decision(f"r{i}"))
        await asyncio.sleep(0)
    await _until(lambda: writer.pending("r9") is None, 10)  # no flush: it commits on its own
    assert counting.batches == [10]
    await writer.close()


async def test_flush_commits_what_was_submitted(store: Store) -> None:
    writer = DecisionWriter(store, interval_s=30)
    await writer.start()
    await writer.flush()  # nothing pending: returns at once
    recs = [_decision(f"r{i}", tier=f"t{i}") for i in range(5)]
    for rec in recs:
        writer.submit(rec)
    await asyncio.sleep(0.05)
    assert store.count_decisions() == 0  # the interval has not passed
    assert writer.pending("r3") == recs[3]
    assert writer.pending("other") is None
    assert _metric("foveal_store_decisions_pending") == 5
    await writer.flush()
    assert store.count_decisions() == 5
    assert writer.pending("r3") is None
    assert _metric("foveal_store_decisions_pending") == 0
    got = store.get_decision("r3")
    assert got is not None and dataclasses.replace(got, created_at=None) == recs[3]
    await writer.close()


async def test_full_queue_refuses_with_rate_limited(store: Store) -> None:
    writer = DecisionWriter(store, interval_s=30, queue_max=3)
    for i in range(3):
        writer.submit(_decision(f"r{i}"))
    with pytest.raises(RateLimited) as err:
        writer.submit(_decision("r3"))
    assert err.value.http_status == 429
    assert writer.pending("r3") is None
    await writer.start()
    await writer.flush()
    writer.submit(_decision("r3"))  # room again
    await writer.close()
    assert store.count_decisions() == 4


async def test_failed_writes_keep_records_and_recover(store: Store) -> None:
    errors = _metric("foveal_store_write_errors_total")
    writer = DecisionWriter(store, interval_s=0.01)
    await writer.start()
    _sql(store.url, "ALTER TABLE decisions RENAME TO decisions_away")  # every insert now fails
    recs = [_decision(f"r{i}") for i in range(3)]
    for rec in recs:
        writer.submit(rec)
    with pytest.raises(DBAPIError):
        await writer.flush()
    assert _metric("foveal_store_write_errors_total") > errors
    assert [writer.pending(r.request_id) for r in recs] == recs
    assert _metric("foveal_store_decisions_pending") == 3
    _sql(store.url, "ALTER TABLE decisions_away RENAME TO decisions")
    await _until(lambda: writer.pending("r2") is None, 15)  # no flush: it retries by itself
    assert store.count_decisions() == 3
    assert writer.pending("r0") is None
    await writer.close()


async def test_duplicate_request_id_does_not_wedge_the_writer(store: Store) -> None:
    writer = DecisionWriter(store, interval_s=30)
    await writer.start()
    writer.submit(_decision("a"))
    await writer.flush()
    errors = _metric("foveal_store_write_errors_total")
    written = _metric("foveal_store_decisions_written_total")
    bad = (_decision("a", reason="again"), _decision("x", features={"not json": object()}))
    for rec in (_decision("b1"), bad[0], _decision("b2"), bad[1], _decision("b3")):
        writer.submit(rec)
    failures: list[Exception] = []
    for _ in range(5):  # each flush raises while a row it waits for was dropped
        try:
            await writer.flush()
            break
        except Exception as exc:
            failures.append(exc)
    assert failures and isinstance(failures[0], Conflict), failures
    assert all(store.get_decision(r) is not None for r in ("b1", "b2", "b3"))
    assert store.get_decision("x") is None
    assert store.get_decision("a").reason == "default tier"  # type: ignore[union-attr]
    assert _metric("foveal_store_write_errors_total") - errors == 2
    assert _metric("foveal_store_decisions_written_total") - written == 3
    writer.submit(_decision("c"))
    await writer.flush()
    assert store.count_decisions() == 5
    await writer.close()


async def test_close_flushes(store: Store) -> None:
    writer = DecisionWriter(store, interval_s=30)
    await writer.start()
    for i in range(3):
        writer.submit(_decision(f"r{i}"))
    await writer.close()
    assert store.count_decisions() == 3
    writer.submit(_decision("late"))  # a request that outlived the writer: logged, not raised
    assert writer.pending("late") is None


async def test_close_reports_what_a_failed_final_write_lost(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    writer = DecisionWriter(store, interval_s=30)
    await writer.start()
    _sql(store.url, "ALTER TABLE decisions RENAME TO decisions_away")
    writer.submit(_decision("r0"))
    writer.submit(_decision("r1"))
    with caplog.at_level(logging.ERROR, logger="foveal.store.writer"):
        await writer.close()
    assert "2 decisions lost" in caplog.text


@pytest.mark.postgres
async def test_writer_survives_a_postgres_restart(fresh_postgres_server: PostgresServer) -> None:
    store = Store(fresh_postgres_server.url)
    store.migrate()
    writer = DecisionWriter(store, interval_s=0.01)
    await writer.start()
    try:
        writer.submit(_decision("before"))
        await writer.flush()
        await asyncio.to_thread(fresh_postgres_server.stop)
        errors = _metric("foveal_store_write_errors_total")
        writer.submit(_decision("during"))
        with pytest.raises(DBAPIError):
            await writer.flush()
        assert _metric("foveal_store_write_errors_total") > errors
        assert writer.pending("during") is not None
        await asyncio.to_thread(fresh_postgres_server.start)
        await _until(lambda: writer.pending("during") is None, 30)
        assert store.count_decisions() == 2
    finally:
        await writer.close()
        store.close()
