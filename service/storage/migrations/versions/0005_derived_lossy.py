"""instance.derived_from, lossy_bound, max_error: bounded-error compression

A rule may name a bounded-error codec (the learned one with delta = N): the stored object is
then a new instance derived from the one received (its own SOP Instance UID, PS3.3
C.7.6.1.1.5). The row takes the new UID and keeps the received one in derived_from (so a
re-send of the original is recognised), the bound the rule allowed and the largest error
measured when the result was verified.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 23:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("derived_from", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lossy_bound", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_error", sa.Integer(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_instance_derived_from"), ["derived_from"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_derived_from"))
        batch_op.drop_column("max_error")
        batch_op.drop_column("lossy_bound")
        batch_op.drop_column("derived_from")
