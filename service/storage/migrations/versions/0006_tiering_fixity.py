"""instance.accessed_at for tier policies; blob.verified_at and fixity_error for fixity

- accessed_at: when the instance was last retrieved (C-GET, C-MOVE, export), for tiers that
  move objects N days after their last access; NULL: never since it was received.
- blob.verified_at, blob.fixity_error: when fixity last re-read the blob, and what was wrong
  (NULL when it read back, checksum and decoding, as written).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accessed_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("blob", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("fixity_error", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_blob_verified_at"), ["verified_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("blob", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blob_verified_at"))
        batch_op.drop_column("fixity_error")
        batch_op.drop_column("verified_at")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("accessed_at")
