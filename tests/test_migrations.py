"""Index schema migrations (service/migrations) on an index that already holds data, on
SQLite and PostgreSQL: an archive upgraded in place must answer as a new one would."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, select, text

from compacs.service.query import find
from compacs.service.storage.index import Index, Series, migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return request.getfixturevalue("pg_url")


def test_0002_counts_the_instances_already_indexed(url: str) -> None:
    """A 0001 index with 2 series of 3 and 1 instances: after the upgrade the per-series
    counters hold 3 and 1, C-FIND reports them, and new arrivals keep counting."""
    engine = create_engine(url)
    migrate(engine, "0001")
    with engine.begin() as conn:
        # no explicit ids: PostgreSQL's sequences must stay in step for later inserts
        conn.execute(text("INSERT INTO patient (patient_id) VALUES ('P1')"))
        conn.execute(
            text(
                "INSERT INTO study (study_instance_uid, patient_pk, created_at)"
                " SELECT '1.2.3', id, CURRENT_TIMESTAMP FROM patient"
            )
        )
        for uid in ("1.2.3.1", "1.2.3.2"):
            conn.execute(
                text(
                    "INSERT INTO series (series_instance_uid, study_pk, modality, created_at)"
                    " SELECT :uid, id, 'CT', CURRENT_TIMESTAMP FROM study"
                ),
                {"uid": uid},
            )
        for i, series_uid in enumerate(("1.2.3.1", "1.2.3.1", "1.2.3.1", "1.2.3.2"), start=1):
            conn.execute(
                text(
                    "INSERT INTO instance (sop_instance_uid, series_pk, sop_class_uid,"
                    " received_transfer_syntax, received_size, state, stored_transfer_syntax,"
                    " stored_size, blob_path, checksum, tier, received_at)"
                    " SELECT :uid, id, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1',"
                    " 10, 'stored', '1.2.840.10008.1.2.1', 10, 'x', 'y', 'hot', CURRENT_TIMESTAMP"
                    " FROM series WHERE series_instance_uid = :series"
                ),
                {"uid": f"1.2.3.1.{i}", "series": series_uid},
            )
    engine.dispose()

    index = Index.open(url)  # upgrades to head
    try:
        with index.reading() as s:
            counts = s.execute(select(Series.series_instance_uid, Series.instance_count)).all()
        assert dict(tuple(row) for row in counts) == {"1.2.3.1": 3, "1.2.3.2": 1}
        ds = Dataset()
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P1", "1.2.3", "1.2.3.2"
        ds.SOPInstanceUID, ds.SOPClassUID, ds.Modality = (
            "1.2.3.2.9",
            "1.2.840.10008.5.1.4.1.1.2",
            "CT",
        )
        index.add_received(
            ds,
            received_transfer_syntax="1.2.840.10008.1.2.1",
            received_size=10,
            stored_transfer_syntax="1.2.840.10008.1.2.1",
            stored_size=10,
            blob_path="z",
            checksum="0",
        )
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.NumberOfStudyRelatedInstances = None
        (answer,) = find(index, q, "study")
        assert answer.NumberOfStudyRelatedInstances == 5
    finally:
        index.close()
