"""the sweep re-sends what is due: workflow_execution.resend_after and its index

Revision ID: engine_0001
Revises: 22a786ba08a1
Create Date: 2026-11-26 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import flowbuilder.platform.models

revision: str = "engine_0001"
down_revision: str | None = "22a786ba08a1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workflow_execution", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "resend_after",
                flowbuilder.platform.models.UTCDateTime(timezone=True),
                nullable=True,
            )
        )
        batch_op.create_index(
            "ix_workflow_execution_status_resend", ["status", "resend_after"], unique=False
        )
    # Unfinished executions from before: due at once (the sweep then spaces them out).
    op.execute(
        "UPDATE workflow_execution SET resend_after = COALESCE(enqueued_at, created_at) "
        "WHERE status IN ('pending', 'running')"
    )


def downgrade() -> None:
    with op.batch_alter_table("workflow_execution", schema=None) as batch_op:
        batch_op.drop_index("ix_workflow_execution_status_resend")
        batch_op.drop_column("resend_after")
