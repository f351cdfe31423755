"""What ingest writes: a received object's instance and blob rows, and the series, study and
patient rows it names, created where missing. The hot path of the node: Core statements and
cached parent rows (the ORM cost more CPU per image than receiving it did, measured with
py-spy)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from compacs.service.storage.index.attributes import (
    _instance_values,
    _int,
    _patient_values,
    _study_patient_values,
    _text,
    _uid,
)
from compacs.service.storage.index.blobs import NewBlob, _blob_values, _release_if_unreferenced
from compacs.service.storage.index.engine import Conflict, Connections
from compacs.service.storage.index.patients import _leave_patient, _patient_for
from compacs.service.storage.index.tables import _BLOB, _INSTANCE, _SERIES, _STUDY
from compacs.service.storage.schema import (
    PATIENT_RECEIVED,
    STATE_PENDING,
    Series,
    Study,
    utcnow,
)

_COUNT_INSTANCE = (  # built once: add_received runs it for every instance
    _SERIES.update()
    .where(_SERIES.c.id == bindparam("pk"))
    .values(instance_count=_SERIES.c.instance_count + 1)
)


class ReceivedVersion(NamedTuple):
    """What is held for a SOP Instance UID, to tell a re-send from a new object."""

    instance_id: int
    version: int
    received_hash: str | None
    received_transfer_syntax: str
    blob_pk: int


class DuplicateInstance(Exception):
    """Another association or process indexed this SOP Instance UID first."""


class IngestWrites(Connections):
    """Received objects into the index; the series rows already seen are cached (rows are
    never deleted), so an instance of a known series costs three statements."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._series_pks: dict[str, int] = {}  # series UID -> row id

    def received_version(self, sop_uid: str) -> ReceivedVersion | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    _INSTANCE.c.id,
                    _INSTANCE.c.version,
                    _INSTANCE.c.received_hash,
                    _INSTANCE.c.received_transfer_syntax,
                    _INSTANCE.c.blob_pk,
                ).where(
                    (_INSTANCE.c.sop_instance_uid == sop_uid)
                    | (_INSTANCE.c.derived_from == sop_uid)
                )
            ).first()
        return ReceivedVersion(*row) if row else None

    def add_received(
        self, ds: Any, blob: NewBlob, owner: str | None, lease_until: datetime | None, **fields: Any
    ) -> int:
        """Index a newly received object and its blob, claimed by `owner` while pending;
        raises DuplicateInstance when its SOP Instance UID was indexed meanwhile."""
        series_uid = _uid(ds, "SeriesInstanceUID")
        try:
            with self._write() as conn:
                series_pk = self._series_pks.get(series_uid)
                if series_pk is None:
                    series_pk = _series_for(conn, ds)
                blob_pk = conn.execute(
                    insert(_BLOB).values(**_blob_values(blob))
                ).inserted_primary_key[0]
                values = {
                    "state": STATE_PENDING,
                    **_instance_values(ds),
                    "series_pk": series_pk,
                    "blob_pk": blob_pk,
                    "blob_offset": 0,
                    "blob_length": blob.size,
                    "checksum": blob.checksum,
                    "claimed_by": owner,
                    "lease_until": lease_until,
                    **fields,
                }
                instance_pk = conn.execute(insert(_INSTANCE).values(**values)).inserted_primary_key[
                    0
                ]
                conn.execute(_COUNT_INSTANCE, {"pk": series_pk})
        except IntegrityError as exc:
            if self.received_version(_uid(ds, "SOPInstanceUID")) is not None:
                raise DuplicateInstance(str(exc.orig)) from exc
            raise
        self._series_pks[series_uid] = series_pk
        return instance_pk

    def replace_received(
        self,
        ds: Any,
        expected: ReceivedVersion,
        blob: NewBlob,
        owner: str | None,
        lease_until: datetime | None,
        **fields: Any,
    ) -> bool:
        """Point an existing instance at a newly received version (on_duplicate = replace);
        False if it changed since `expected` was read. The version's patient, study and
        series values replace the index's, and an instance re-sent under another study or
        series moves there (its counters follow). The old blob is released, not deleted."""
        try:
            self._replace(ds, expected, blob, owner, lease_until, fields)
        except Conflict:
            return False
        self._series_pks.clear()  # a series may have moved to another study
        return True

    def _replace(
        self,
        ds: Any,
        expected: ReceivedVersion,
        blob: NewBlob,
        owner: str | None,
        lease_until: datetime | None,
        fields: dict[str, Any],
    ) -> None:
        with self._write() as conn:
            series_pk = _series_for(conn, ds, update=True)
            blob_pk = conn.execute(insert(_BLOB).values(**_blob_values(blob))).inserted_primary_key[
                0
            ]
            old_series = conn.execute(
                select(_INSTANCE.c.series_pk).where(_INSTANCE.c.id == expected.instance_id)
            ).scalar()
            changed = conn.execute(
                _INSTANCE.update()
                .where(
                    _INSTANCE.c.id == expected.instance_id, _INSTANCE.c.version == expected.version
                )
                .values(
                    {
                        "state": STATE_PENDING,
                        "codec": None,
                        "stored_at": None,
                        "attempts": 0,
                        "last_error": None,
                        **_instance_values(ds),
                        **fields,
                        "series_pk": series_pk,
                        "blob_pk": blob_pk,
                        "blob_offset": 0,
                        "blob_length": blob.size,
                        "frame_first": None,
                        "frame_count": None,
                        "checksum": blob.checksum,
                        "claimed_by": owner,
                        "lease_until": lease_until,
                        "version": expected.version + 1,
                    }
                )
            ).rowcount
            if changed != 1:
                raise Conflict  # rolls back the blob row too
            if old_series != series_pk:
                conn.execute(
                    _SERIES.update()
                    .where(_SERIES.c.id == old_series)
                    .values(instance_count=_SERIES.c.instance_count - 1)
                )
                conn.execute(_COUNT_INSTANCE, {"pk": series_pk})
            _release_if_unreferenced(conn, expected.blob_pk)


def _series_for(conn: Connection, ds: Any, update: bool = False) -> int:
    """The series row of `ds`, created with its study and patient where missing; with
    `update`, existing rows take the values of `ds` (a replaced object): its study's
    patient attributes change, no other study's."""
    study = _study_for(conn, ds, update)
    return _upsert(
        conn,
        Series,
        "series_instance_uid",
        _uid(ds, "SeriesInstanceUID"),
        {
            "study_pk": study,
            "modality": _text(ds, "Modality", 16),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription"),
            "body_part_examined": _text(ds, "BodyPartExamined", 64),
        },
        update,
    )


def _study_for(conn: Connection, ds: Any, update: bool) -> int:
    """The study row of `ds`, created (with its patient row) where missing. With `update` (a
    replaced object) it takes the values of `ds`, its patient attributes included, and moves
    to the patient row they name: other studies of the old row keep theirs."""
    uid = _uid(ds, "StudyInstanceUID")
    row = conn.execute(
        select(_STUDY.c.id, _STUDY.c.patient_pk).where(_STUDY.c.study_instance_uid == uid)
    ).first()
    if row is not None and not update:
        return row.id
    patient = _patient_values(ds)
    patient_pk = _patient_for(conn, patient, uid)
    values = {
        "patient_pk": patient_pk,
        "study_date": _text(ds, "StudyDate", 8),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber", 64),
        "study_id": _text(ds, "StudyID", 64),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician_name": _text(ds, "ReferringPhysicianName"),
        **_study_patient_values(patient),
        "patient_source": PATIENT_RECEIVED,
    }
    if row is not None:
        conn.execute(_STUDY.update().where(_STUDY.c.id == row.id).values(**values))
        if row.patient_pk != patient_pk:
            _leave_patient(conn, row.patient_pk)
        return row.id
    study_pk = _upsert(conn, Study, "study_instance_uid", uid, values, False)
    # Another process inserted the study first, under its own patient row: ours may be empty.
    if conn.scalar(select(_STUDY.c.patient_pk).where(_STUDY.c.id == study_pk)) != patient_pk:
        _leave_patient(conn, patient_pk)
    return study_pk


def _upsert(
    conn: Connection, model: type, key: str, value: str, values: dict[str, Any], update: bool
) -> int:
    """The id of the row whose unique `key` is `value`, inserted if missing. Another process
    may insert it between our look and our insert: the unique key says so, and we read its
    row (the savepoint keeps our transaction)."""
    table = model.__table__
    row_id = conn.execute(select(table.c.id).where(table.c[key] == value)).scalar()
    if row_id is None:
        try:
            with conn.begin_nested():
                values = {**values, key: value}
                if "created_at" in table.c:
                    values["created_at"] = utcnow()
                return conn.execute(insert(table).values(**values)).inserted_primary_key[0]
        except IntegrityError:
            row_id = conn.execute(select(table.c.id).where(table.c[key] == value)).scalar()
            if row_id is None:
                raise
    if update:
        conn.execute(table.update().where(table.c.id == row_id).values(**values))
    return row_id
