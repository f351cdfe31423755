"""blob table and references; instance version and claims; one place for the tier

- blob: one row per durable file (tier, path, kind, size, checksum, released_at). Every
  instance's blob_path/checksum/stored_size becomes a blob row; the instance points at it
  (blob_pk) with where in it (blob_offset, blob_length, frame_first, frame_count) and keeps
  the checksum of that part. A blob holding a whole series is then a row away.
- instance.version (compare-and-swap) and claimed_by/lease_until (the process compressing
  a pending instance, and until when): several processes share one index and archive.
- instance.tier and instance.blob_path are dropped: the tier is the blob's, the path too.
  The tier was never read, and every blob so far sits on the hot tier's root.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(length=80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("path"),
    )
    with op.batch_alter_table("blob", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blob_released_at"), ["released_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_blob_tier"), ["tier"], unique=False)
    # One row per path (paths were unique per instance; grouped all the same, so that an
    # index a hand or a test filled with shared paths migrates too)
    op.execute(
        "INSERT INTO blob (tier, path, kind, size, checksum, created_at)"
        " SELECT 'hot', blob_path, 'instance', MAX(stored_size), MIN(checksum),"
        " MIN(COALESCE(stored_at, received_at)) FROM instance GROUP BY blob_path"
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("blob_pk", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("blob_offset", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("blob_length", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("frame_first", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("frame_count", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE instance SET blob_length = stored_size,"
        " blob_pk = (SELECT blob.id FROM blob WHERE blob.path = instance.blob_path)"
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.alter_column("blob_pk", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("blob_length", existing_type=sa.BigInteger(), nullable=False)
        batch_op.create_foreign_key("fk_instance_blob", "blob", ["blob_pk"], ["id"])
        batch_op.create_index(batch_op.f("ix_instance_blob_pk"), ["blob_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_instance_claimed_by"), ["claimed_by"], unique=False)
        batch_op.drop_column("blob_path")
        batch_op.drop_column("tier")


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tier", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("blob_path", sa.String(length=255), nullable=True))
    op.execute(
        "UPDATE instance SET tier = (SELECT blob.tier FROM blob WHERE blob.id = instance.blob_pk),"
        " blob_path = (SELECT blob.path FROM blob WHERE blob.id = instance.blob_pk)"
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.alter_column("tier", existing_type=sa.String(length=16), nullable=False)
        batch_op.alter_column("blob_path", existing_type=sa.String(length=255), nullable=False)
        batch_op.drop_index(batch_op.f("ix_instance_claimed_by"))
        batch_op.drop_index(batch_op.f("ix_instance_blob_pk"))
        batch_op.drop_constraint("fk_instance_blob", type_="foreignkey")
        for column in (
            "lease_until",
            "claimed_by",
            "version",
            "frame_count",
            "frame_first",
            "blob_length",
            "blob_offset",
            "blob_pk",
        ):
            batch_op.drop_column(column)
    op.drop_table("blob")
