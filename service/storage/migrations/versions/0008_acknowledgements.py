"""acknowledgement: flagged and parked objects an administrator has acknowledged

`compacs problems ack` records who acknowledged which problem and when, so that
`compacs verify` can pass as a health check once every flag is known. One row per subject
(kind "instance": a SOP Instance UID), the problem text as it read then; a changed problem is
unacknowledged again. A new table: existing rows are untouched.

Revision ID: 0008
Revises: 0006 (0007, the patient attributes per study, when both are merged)
Create Date: 2026-12-07 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acknowledgement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("problem", sa.Text(), nullable=False),
        sa.Column("acknowledged_by", sa.String(length=80), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "subject", name="uq_acknowledgement_subject"),
    )


def downgrade() -> None:
    op.drop_table("acknowledgement")
