"""execution_phase inputs and outputs as ``json`` rather than ``jsonb`` (PostgreSQL)

A phase's inputs and outputs are the largest documents the engine writes, two per phase,
and nothing queries inside them. ``jsonb`` parses each into its binary form on every
write; ``json`` checks the text and keeps it as sent. Measured on a 110 KB document: an
UPDATE of 3.4 ms as jsonb, 1.0 ms as json. Reading them back is unchanged for the
platform (the driver parses either into Python objects); key order is now kept as the
node produced it, and duplicate keys cannot occur (the engine serialises them).

Changing a column's type rewrites the table under an ACCESS EXCLUSIVE lock: on a large
``execution_phase`` run this migration at a quiet time (workers stopped or idle). The
lz4 compression set by perf_0001 is set again afterwards. A no-op on SQLite.

Revision ID: perf_0002
Revises: perf_0001
Create Date: 2026-11-27 02:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "perf_0002"
down_revision: str | None = "perf_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("inputs", "outputs")


def _retype(kind: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    changes = ", ".join(
        f"ALTER COLUMN {column} TYPE {kind} USING {column}::{kind}" for column in _COLUMNS
    )
    op.execute(f"ALTER TABLE execution_phase {changes}")
    lz4 = bind.exec_driver_sql(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
        "AND 'lz4' = ANY(enumvals)"
    ).first()
    if lz4 is not None:
        # A new type may not carry the column's compression over: set it again.
        op.execute(
            "ALTER TABLE execution_phase "
            + ", ".join(f"ALTER COLUMN {column} SET COMPRESSION lz4" for column in _COLUMNS)
        )


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    # json -> jsonb parses every stored document again (it succeeds: the engine only
    # stores what jsonb accepts, no NUL escape, no lone surrogate).
    _retype("jsonb")
