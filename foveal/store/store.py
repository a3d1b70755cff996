"""The store: decisions, feedback, tenants and API keys in SQLite or PostgreSQL.

Every method is blocking; async callers run them with ``asyncio.to_thread`` (the
DecisionWriter does so for decisions). Records go in and out as plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, and_, create_engine, event, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from foveal.errors import Conflict
from foveal.store.models import ApiKey, Decision, Feedback, LearnedState, Tenant
from foveal.store.records import ApiKeyInfo, DecisionRecord, FeedbackRecord, TenantRecord

__all__ = ["KEY_PREFIX", "Store", "alembic_config"]

log = logging.getLogger(__name__)

KEY_PREFIX = "fvl_"
_DISPLAY_CHARS = 8  # characters after KEY_PREFIX kept to name a key
_MIGRATION_LOCK = 0x466F7665616C  # pg advisory lock: one migrating replica at a time
_DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(DecisionRecord))
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    """An Alembic config for the store's migrations (no ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
    return cfg


def _now() -> datetime:
    return datetime.now(UTC)


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _is_unique_violation(exc: IntegrityError) -> bool:
    """True for a duplicate primary/unique key (not for NOT NULL or foreign key errors)."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "23505":  # PostgreSQL unique_violation
        return True
    name = getattr(orig, "sqlite_errorname", "")
    return name in ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE")


def _sqlite_file(url: URL) -> Path | None:
    db = url.database
    if url.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _set_sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=5000")  # first: the others may wait on a lock
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # feedback acknowledged == feedback on disk
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)  # pre-ping: survive server restarts
    if url.database in (None, "", ":memory:"):
        # In-memory: one shared connection, or every thread would see its own empty DB.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)
    event.listen(engine, "connect", _set_sqlite_pragmas)
    return engine


def _decision_record(row: Decision) -> DecisionRecord:
    return DecisionRecord(**{name: getattr(row, name) for name in _DECISION_FIELDS})


def _tenant_record(row: Tenant) -> TenantRecord:
    return TenantRecord(row.name, row.max_tokens_cap, row.created_at)


class Store:
    """Blocking access to Foveal's database; thread-safe (one engine, pooled connections)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._parsed = make_url(url)
        self._engine = _make_engine(self._parsed)
        self._session = sessionmaker(self._engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({self._parsed.render_as_string(hide_password=True)!r})"

    @property
    def url(self) -> str:
        return self._url

    def migrate(self) -> None:
        """Bring the schema to the newest revision (a no-op when it is already there)."""
        path = _sqlite_file(self._parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        cfg = alembic_config()
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self._engine.dispose()

    # ---- decisions and feedback ------------------------------------------------------------

    def add_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Insert ``records`` in one transaction; a reused request_id raises Conflict."""
        if not records:
            return
        now = _now()
        rows = []
        for rec in records:
            row = {name: getattr(rec, name) for name in _DECISION_FIELDS}
            if row["created_at"] is None:
                row["created_at"] = now
            rows.append(row)
        try:
            with self._session.begin() as s:
                s.execute(insert(Decision), rows)
        except IntegrityError as exc:
            if _is_unique_violation(exc):
                raise Conflict(
                    "a decision with one of these request ids is already stored",
                    code="duplicate_request_id",
                ) from exc
            raise

    def get_decision(self, request_id: str) -> DecisionRecord | None:
        with self._session() as s:
            row = s.get(Decision, request_id)
            return None if row is None else _decision_record(row)

    def count_decisions(self) -> int:
        with self._session() as s:
            return int(s.scalar(select(func.count()).select_from(Decision)) or 0)

    def add_feedback(self, record: FeedbackRecord) -> None:
        """Store ``record``, committed on return; a second one for the request raises Conflict."""
        row = Feedback(
            request_id=record.request_id,
            tenant=record.tenant,
            score=record.score,
            created_at=record.created_at or _now(),
        )
        try:
            with self._session.begin() as s:
                s.add(row)
        except IntegrityError as exc:
            if _is_unique_violation(exc):
                raise Conflict(
                    f"feedback for request {record.request_id!r} was already given",
                    param="request_id",
                    code="feedback_already_given",
                ) from exc
            raise

    def get_feedback(self, request_id: str) -> FeedbackRecord | None:
        with self._session() as s:
            row = s.get(Feedback, request_id)
            if row is None:
                return None
            return FeedbackRecord(row.request_id, row.tenant, row.score, row.created_at)

    # ---- tenants and API keys --------------------------------------------------------------

    def get_tenant(self, name: str) -> TenantRecord | None:
        with self._session() as s:
            row = s.get(Tenant, name)
            return None if row is None else _tenant_record(row)

    def ensure_tenant(self, name: str, *, max_tokens_cap: int | None = None) -> TenantRecord:
        """The tenant ``name``, created (with ``max_tokens_cap``) if it does not exist yet."""
        found = self.get_tenant(name)
        if found is not None:
            return found
        try:
            with self._session.begin() as s:
                s.add(Tenant(name=name, max_tokens_cap=max_tokens_cap, created_at=_now()))
        except IntegrityError as exc:
            if not _is_unique_violation(exc):
                raise
            log.debug("tenant %r was created concurrently", name)
        found = self.get_tenant(name)
        if found is None:  # pragma: no cover - deleted right after being created
            raise RuntimeError(f"tenant {name!r} vanished while being created")
        return found

    def set_tenant_cap(self, name: str, max_tokens_cap: int | None) -> TenantRecord:
        """Set (or clear, with None) a tenant's max_tokens cap, creating the tenant if needed."""
        self.ensure_tenant(name, max_tokens_cap=max_tokens_cap)
        with self._session.begin() as s:
            s.execute(
                update(Tenant).where(Tenant.name == name).values(max_tokens_cap=max_tokens_cap)
            )
        found = self.get_tenant(name)
        assert found is not None
        return found

    def create_api_key(self, tenant: str) -> str:
        """A new key for ``tenant`` (created if needed). Only its hash is kept: show it once."""
        self.ensure_tenant(tenant)
        for _ in range(5):
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            row = ApiKey(
                tenant=tenant,
                key_hash=_key_hash(key),
                prefix=key[len(KEY_PREFIX) : len(KEY_PREFIX) + _DISPLAY_CHARS],
                created_at=_now(),
            )
            try:
                with self._session.begin() as s:
                    s.add(row)
            except IntegrityError as exc:
                if not _is_unique_violation(exc):
                    raise
                continue  # the display prefix collided with another key's: draw again
            log.info("created API key %s… for tenant %r", row.prefix, tenant)
            return key
        raise RuntimeError("could not draw an unused API key prefix")

    def tenant_for_key(self, key: str) -> TenantRecord | None:
        """The tenant owning ``key``; None if the key is unknown or revoked."""
        stmt = (
            select(Tenant)
            .join(ApiKey, ApiKey.tenant == Tenant.name)
            .where(ApiKey.key_hash == _key_hash(key), ApiKey.revoked_at.is_(None))
        )
        with self._session() as s:
            row = s.scalars(stmt).first()
            return None if row is None else _tenant_record(row)

    def revoke_api_key(self, prefix: str) -> bool:
        """Revoke the key shown as ``prefix``; False if there is no such unrevoked key."""
        stmt = (
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=_now())
        )
        with self._session.begin() as s:
            revoked = s.execute(stmt).rowcount > 0  # type: ignore[attr-defined]
        if revoked:
            log.info("revoked API key %s…", prefix)
        return revoked

    def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if tenant is not None:
            stmt = stmt.where(ApiKey.tenant == tenant)
        with self._session() as s:
            return [
                ApiKeyInfo(r.prefix, r.tenant, r.created_at, r.revoked_at is not None)
                for r in s.scalars(stmt)
            ]

    # ---- learned state and logged feedback (learning policies, off-policy evaluation) ------

    def get_learned_state(self, key: str) -> dict[str, Any] | None:
        """The payload stored under ``key``, or None."""
        with self._session() as s:
            row = s.get(LearnedState, key)
            return None if row is None else dict(row.payload)

    def put_learned_state(
        self, key: str, tenant: str | None, policy: str, payload: dict[str, Any]
    ) -> None:
        """Insert or replace the payload under ``key`` (one statement: no read-modify-write)."""
        values = {
            "key": key,
            "tenant": tenant,
            "policy": policy,
            "payload": payload,
            "updated_at": _now(),
        }
        changed = {k: values[k] for k in ("tenant", "policy", "payload", "updated_at")}
        dialect = self._engine.dialect.name
        if dialect == "postgresql":
            pg = postgresql.insert(LearnedState).values(**values)
            stmt: Any = pg.on_conflict_do_update(index_elements=["key"], set_=changed)
        elif dialect == "sqlite":
            lite = sqlite.insert(LearnedState).values(**values)
            stmt = lite.on_conflict_do_update(index_elements=["key"], set_=changed)
        else:  # pragma: no cover - the store runs on SQLite and PostgreSQL only
            raise RuntimeError(f"no upsert for the {dialect} dialect")
        with self._session.begin() as s:
            s.execute(stmt)

    def list_learned_state(self, policy: str) -> dict[str, dict[str, Any]]:
        """Every payload of ``policy``, by key."""
        stmt = select(LearnedState.key, LearnedState.payload).where(LearnedState.policy == policy)
        with self._session() as s:
            return {key: dict(payload) for key, payload in s.execute(stmt)}

    def iter_decisions_with_feedback(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        tenant: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[tuple[DecisionRecord, FeedbackRecord]]:
        """Decisions that got feedback, oldest first, read ``page_size`` rows at a time.

        Pages follow (created_at, request_id) from the last row seen (keyset pagination), so
        memory stays bounded and rows written meanwhile neither repeat nor shift pages.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        base = select(Decision, Feedback).join(
            Feedback,
            and_(Feedback.request_id == Decision.request_id, Feedback.tenant == Decision.tenant),
        )
        if since is not None:
            base = base.where(Decision.created_at >= since)
        if until is not None:
            base = base.where(Decision.created_at < until)
        if tenant is not None:
            base = base.where(Decision.tenant == tenant)
        after: tuple[datetime, str] | None = None
        while True:
            stmt = base
            if after is not None:
                stmt = stmt.where(
                    or_(
                        Decision.created_at > after[0],
                        and_(Decision.created_at == after[0], Decision.request_id > after[1]),
                    )
                )
            stmt = stmt.order_by(Decision.created_at, Decision.request_id).limit(page_size)
            with self._session() as s:
                rows = [
                    (
                        _decision_record(d),
                        FeedbackRecord(f.request_id, f.tenant, f.score, f.created_at),
                    )
                    for d, f in s.execute(stmt)
                ]
            yield from rows
            if len(rows) < page_size:
                return
            last = rows[-1][0]
            assert last.created_at is not None
            after = (last.created_at, last.request_id)
