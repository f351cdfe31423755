"""Patient attributes per study; patient rows per PatientID + issuer + name + birth date

- study: patient_name, patient_birth_date, patient_sex, issuer_of_patient_id,
  other_patient_ids (the study's own, as received), patient_source (where they came from).
- patient: identity (the unique key, schema.patient_identity) instead of a unique
  patient_id, issuer_of_patient_id, patient_id_conflict.

The old index kept one patient row per PatientID with the values of whichever object came
first, so its values are not each study's. This revision copies them onto the studies as a
start and leaves patient_source NULL: `compacs db upgrade` then reads one stored object of
each study (service/backfill.py; a migration cannot read the archive) and the
index refuses other commands until that is done. The backfill commits study by study, so a
re-run after a kill continues where it stopped.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 00:00:00
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Names for the constraints 0001 left unnamed, so that SQLite's batch mode can drop them.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
_STUDY_COLUMNS = ("patient_name", "patient_birth_date", "patient_sex")


def _identity(patient_id: str, name: str | None, birth_date: str | None, row_id: int) -> str:
    """schema.patient_identity as of this revision (copied: a migration must not change when
    the code does), with the old row's id standing in for the study of an empty PatientID:
    the backfill gives each such study a row of its own."""
    if patient_id:
        parts = ["id", patient_id, "", (name or "").rstrip("^ "), birth_date or ""]
    else:
        parts = ["study", f"legacy-patient-row-{row_id}"]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_name", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("patient_birth_date", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("patient_sex", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("other_patient_ids", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("patient_source", sa.String(length=16), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_study_patient_source"), ["patient_source"], unique=False
        )
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.add_column(sa.Column("identity", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column(
                "patient_id_conflict", sa.Boolean(), server_default=sa.false(), nullable=False
            )
        )

    conn = op.get_bind()
    for column in _STUDY_COLUMNS:
        conn.execute(
            sa.text(
                f"UPDATE study SET {column} ="
                f" (SELECT patient.{column} FROM patient WHERE patient.id = study.patient_pk)"
            )
        )
    rows = conn.execute(
        sa.text("SELECT id, patient_id, patient_name, patient_birth_date FROM patient")
    ).all()
    if rows:
        conn.execute(
            sa.text("UPDATE patient SET identity = :identity WHERE id = :id"),
            [{"identity": _identity(r[1], r[2], r[3], r[0]), "id": r[0]} for r in rows],
        )

    if conn.dialect.name == "postgresql":  # 0001's unnamed constraint, as PostgreSQL named it
        op.drop_constraint("patient_patient_id_key", "patient", type_="unique")
    with op.batch_alter_table("patient", schema=None, naming_convention=_NAMING) as batch_op:
        if conn.dialect.name != "postgresql":
            batch_op.drop_constraint("uq_patient_patient_id", type_="unique")
        batch_op.alter_column("identity", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_patient_identity"), ["identity"])
        batch_op.create_index(batch_op.f("ix_patient_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_patient_patient_id_conflict"), ["patient_id_conflict"], unique=False
        )


def downgrade() -> None:
    raise NotImplementedError(
        "0007 splits patients by name and birth date; going back would merge them again"
    )
