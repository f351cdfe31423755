"""instance.defects, attempts, last_error; received_hash of the whole data set

- defects: why an object kept as received is non-conformant (pixel data that disagrees with
  its attributes, UIDs outside digits and dots, undecodable compressed pixel data): stats
  counts them, verify lists them. NULL: nothing found.
- attempts, last_error: compression attempts that failed and the last reason; an object that
  failed `[ingest] max_attempts` times is parked (state "parked") instead of retried for ever.
- received_pixel_hash becomes received_hash, a hash of the whole data set without its file
  meta group: a corrected report, or an image corrected only in its attributes, re-sent under
  the same UID is no longer taken for a harmless re-send. Rows indexed before this revision
  keep their pixel hash, which never equals a data set hash: a re-send of such an object
  counts as changed, the safe direction (keep_first warns, replace stores it again).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.alter_column("received_pixel_hash", new_column_name="received_hash")
        batch_op.add_column(sa.Column("defects", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("last_error")
        batch_op.drop_column("attempts")
        batch_op.drop_column("defects")
        batch_op.alter_column("received_hash", new_column_name="received_pixel_hash")
