"""The store's tables as SQLAlchemy 2 declarative models (private to ``foveal.store``).

Migrations in ``migrations/versions`` create exactly these tables; a test compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["ApiKey", "Base", "Decision", "Feedback", "LearnedState", "Tenant", "UtcDateTime"]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored and returned in UTC on every backend.

    SQLite keeps no zone, so naive values read back are UTC by construction; naive values
    written are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime()}


class Decision(Base):
    """One routing decision (``DecisionRecord``), written in batches by the DecisionWriter."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_tenant_created_at", "tenant", "created_at"),)

    request_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str] = mapped_column(String(64))
    chosen_tier: Mapped[str] = mapped_column(String(64))
    requested_model: Mapped[str] = mapped_column(String(255))
    policy: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    propensity: Mapped[float] = mapped_column(Float)
    features: Mapped[dict[str, Any]] = mapped_column(JSON)
    predicted: Mapped[dict[str, float]] = mapped_column(JSON)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    pool_latency_ms: Mapped[float | None] = mapped_column(Float)
    cost: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    edge: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]


class Feedback(Base):
    """At most one feedback per request: the primary key makes feedback tokens single use."""

    __tablename__ = "feedback"

    request_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    max_tokens_cap: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]


class ApiKey(Base):
    """An API key, kept as its SHA-256 only, plus a short prefix to name it by."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class LearnedState(Base):
    """Parameters a learning policy persists (one JSON blob per key); unused so far."""

    __tablename__ = "learned_state"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(128))
    policy: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime]
