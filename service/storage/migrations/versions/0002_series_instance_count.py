"""series.instance_count: the instances of each series, kept on ingest

C-FIND's NumberOf*RelatedInstances counted instance rows for every answer: 115-170 ms of a
study-level query answering 3,481 or 10,000 of 10,000 studies (2.4 M instances). Rows are
never deleted, so a counter incremented with each insert stays exact.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 05:35:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("instance_count", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE series SET instance_count ="
        " (SELECT count(*) FROM instance WHERE instance.series_pk = series.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("instance_count")
