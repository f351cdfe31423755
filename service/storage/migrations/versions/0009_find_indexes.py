"""C-FIND indexes for an index of a million instances (bench/find_scale.py)

- lower(patient_name) on study and patient: PN keys match case-folded (query._text_match:
  lower(column) LIKE lower(pattern), lower(column) = lower(value)), which no plain index on
  the column serves, so "SMITH*" read every study. On PostgreSQL the index takes the
  text_pattern_ops operator class: the default one cannot serve LIKE prefixes unless the
  database's collation is "C". SQLite gets the same expression (it serves the exact match;
  SQLite's LIKE uses no expression index).
- series (study_pk, modality, instance_count): each study answer reads its series three
  times (ModalitiesInStudy, NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances) and
  ModalitiesInStudy matching once more; with all three columns in the index those are
  index-only scans instead of a heap visit per series.

New indexes only: no row changes. CREATE INDEX locks writes to the table while it builds
(seconds for 10,000 studies; measured in docs/benchmarks.md on the million-instance index).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NAME_INDEXES = {"study": "ix_study_patient_name_lower", "patient": "ix_patient_patient_name_lower"}


def upgrade() -> None:
    pattern_ops = " text_pattern_ops" if op.get_bind().dialect.name == "postgresql" else ""
    for table, name in NAME_INDEXES.items():
        op.create_index(name, table, [sa.text(f"lower(patient_name){pattern_ops}")])
    op.create_index(
        "ix_series_study_modality_count", "series", ["study_pk", "modality", "instance_count"]
    )


def downgrade() -> None:
    op.drop_index("ix_series_study_modality_count", table_name="series")
    for table, name in NAME_INDEXES.items():
        op.drop_index(name, table_name=table)
