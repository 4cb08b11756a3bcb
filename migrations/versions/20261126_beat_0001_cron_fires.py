"""cron fires: scheduled_for (unique per workflow) and skipped_fire_times on executions

Revision ID: beat_0001
Revises: engine_0001
Create Date: 2026-11-26 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import flowbuilder.platform.models

revision: str = "beat_0001"
down_revision: str | None = "engine_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The new status "skipped" needs no DDL: statuses are stored in a plain varchar(16).
    # Batch mode: SQLite cannot add a unique constraint in place (the table is rebuilt).
    with op.batch_alter_table("workflow_execution") as batch:
        batch.add_column(
            sa.Column(
                "scheduled_for",
                flowbuilder.platform.models.UTCDateTime(timezone=True),
                nullable=True,
            )
        )
        batch.add_column(
            sa.Column(
                "skipped_fire_times",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch.create_unique_constraint(
            op.f("uq_workflow_execution_workflow_id_scheduled_for"),
            ["workflow_id", "scheduled_for"],
        )


def downgrade() -> None:
    with op.batch_alter_table("workflow_execution") as batch:
        batch.drop_constraint(
            op.f("uq_workflow_execution_workflow_id_scheduled_for"), type_="unique"
        )
        batch.drop_column("skipped_fire_times")
        batch.drop_column("scheduled_for")
