"""Initial schema: decisions, feedback, tenants, api_keys, learned_state.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(64), nullable=False),
        sa.Column("chosen_tier", sa.String(64), nullable=False),
        sa.Column("requested_model", sa.String(255), nullable=False),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("propensity", sa.Float(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("predicted", sa.JSON(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("pool_latency_ms", sa.Float(), nullable=True),
        sa.Column("cost", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("edge", sa.String(16), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("request_id", name="pk_decisions"),
    )
    op.create_index("ix_decisions_tenant_created_at", "decisions", ["tenant", "created_at"])

    op.create_table(
        "feedback",
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("request_id", name="pk_feedback"),
    )

    op.create_table(
        "tenants",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("max_tokens_cap", sa.Integer(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_tenants"),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name="fk_api_keys_tenant_tenants"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])

    op.create_table(
        "learned_state",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("key", name="pk_learned_state"),
    )


def downgrade() -> None:
    op.drop_table("learned_state")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("feedback")
    op.drop_index("ix_decisions_tenant_created_at", table_name="decisions")
    op.drop_table("decisions")
