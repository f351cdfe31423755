"""Index schema migrations (service/migrations) on an index that already holds data, on
SQLite and PostgreSQL: an archive upgraded in place must answer as a new one would."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, select, text

from compacs.service.query import find
from compacs.service.storage.index import Blob, Index, Instance, NewBlob, Series
from compacs.service.storage.schema import IndexOutOfDate, check_revision, migrate


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

    migrate(create_engine(url))  # what `compacs db upgrade` does
    index = Index.open(url)
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
            NewBlob("z", 10, "0"),
            None,
            None,
            received_transfer_syntax="1.2.840.10008.1.2.1",
            received_size=10,
            stored_transfer_syntax="1.2.840.10008.1.2.1",
            stored_size=10,
        )
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.NumberOfStudyRelatedInstances = None
        (answer,) = find(index, q, "study")
        assert answer.NumberOfStudyRelatedInstances == 5
    finally:
        index.close()


def test_0004_turns_blob_paths_into_blob_rows_and_references(url: str) -> None:
    """A 0003 index holding a pending and a stored instance: after the upgrade each has a
    blob row with its path, size and checksum, a reference to it, version 0 and no claim."""
    engine = create_engine(url)
    migrate(engine, "0003")
    rows = [
        ("1.2.3.9.1", "stored", "hot/ab/x/y/one-1.dcm", "sha256:aa", 100),
        ("1.2.3.9.2", "pending", "incoming/two-2.dcm", "sha256:bb", 200),
    ]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO patient (patient_id) VALUES ('P9')"))
        conn.execute(
            text(
                "INSERT INTO study (study_instance_uid, patient_pk, created_at)"
                " SELECT '1.2.3.9', id, CURRENT_TIMESTAMP FROM patient"
            )
        )
        conn.execute(
            text(
                "INSERT INTO series (series_instance_uid, study_pk, created_at, instance_count)"
                " SELECT '1.2.3.9.0', id, CURRENT_TIMESTAMP, 2 FROM study"
            )
        )
        for uid, state, path, digest, size in rows:
            conn.execute(
                text(
                    "INSERT INTO instance (sop_instance_uid, series_pk, sop_class_uid,"
                    " received_transfer_syntax, received_size, state, stored_transfer_syntax,"
                    " stored_size, blob_path, checksum, tier, received_at, attempts)"
                    " SELECT :uid, id, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1',"
                    " :size, :state, '1.2.840.10008.1.2.1', :size, :path, :digest, 'hot',"
                    " CURRENT_TIMESTAMP, 0 FROM series"
                ),
                {"uid": uid, "state": state, "path": path, "digest": digest, "size": size},
            )
    with pytest.raises(IndexOutOfDate, match="compacs db upgrade"):
        check_revision(engine, "test")
    migrate(engine)
    engine.dispose()
    index = Index.open(url)
    try:
        got = {
            inst.sop_instance_uid: inst
            for inst in index.instances()  # blobs loaded with the instances
        }
        for uid, state, path, digest, size in rows:
            inst = got[uid]
            assert (inst.state, inst.blob.path, inst.blob.size, inst.blob.checksum) == (
                state,
                path,
                size,
                digest,
            )
            assert (inst.blob_offset, inst.blob_length, inst.checksum) == (0, size, digest)
            assert inst.version == 0 and inst.claimed_by is None and inst.blob.tier == "hot"
        with index.reading() as s:
            assert s.query(Blob).count() == 2 and s.query(Instance).count() == 2
        # the pending one is claimable, as a crashed node's would be
        (claim,) = index.claim_pending("me", index_lease())
        assert claim.sop_instance_uid == "1.2.3.9.2" and claim.blob_path == "incoming/two-2.dcm"
    finally:
        index.close()


def index_lease():  # noqa: ANN201
    from compacs.service.storage.index import lease

    return lease(60)
