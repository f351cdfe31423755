"""Instances read with their blob, series and study (C-GET/C-MOVE, export, verify, the blob
readers), and the one way C-FIND and retrieval match UID keys. These hand mapped rows to
their callers: the ORM half of the package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import joinedload
from sqlalchemy.sql.elements import ColumnElement

from compacs.service.storage.index.engine import Connections
from compacs.service.storage.index.tables import _BLOB, _INSTANCE, _SERIES, _STUDY
from compacs.service.storage.schema import Blob, Instance, Patient, Series, Study, utcnow


def uid_in(column: Any, uids: Sequence[str]) -> ColumnElement[bool]:
    """Exact UID matching on a list of UIDs (PS3.4 C.2.2.2.2; UIDs take no wildcards, so "*"
    and "?" are plain characters that no UID has), the one way C-FIND (query.py) and
    C-GET/C-MOVE (retrieve.py) match UID keys. One IN list: one OR per UID made SQLite refuse
    2,000 UIDs ("Expression tree is too large (maximum depth 1000)"); an IN list of 40,000
    took 0.2 s here. Its limit is the driver's bound values per statement (SQLite: 32,766 by
    default, 250,000 in Debian's; PostgreSQL: 65,535), beyond what an explicit VR identifier
    can carry (64 KiB per element: about 1,000 full-length UIDs)."""
    return column.in_(list(uids))


# Built once: constructing and cache-keying the statement cost as much as running it.
_JOINED = (
    select(
        *_INSTANCE.c,
        _BLOB.c.tier,
        _BLOB.c.path,
        _BLOB.c.kind,
        _BLOB.c.size,
        _BLOB.c.checksum.label("blob_checksum"),
        _SERIES.c.series_instance_uid,
        _SERIES.c.study_pk,
        _STUDY.c.study_instance_uid,
    )
    .join(_BLOB, _BLOB.c.id == _INSTANCE.c.blob_pk)
    .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
    .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
)
_BY_UID = _JOINED.where(_INSTANCE.c.sop_instance_uid == bindparam("sop"))
_BY_SERIES_UID = _JOINED.where(_SERIES.c.series_instance_uid == bindparam("series"))


class Reads(Connections):
    """Instances by id or by unique keys, and when they were last read."""

    def instance(self, instance_pk: int) -> Instance | None:
        """One instance, read afresh (a reader whose blob was gone looks again)."""
        with self.reading() as s:
            return s.scalar(
                select(Instance)
                .options(
                    joinedload(Instance.blob), joinedload(Instance.series).joinedload(Series.study)
                )
                .where(Instance.id == instance_pk)
            )

    def instances(
        self, *, study_uid: str | None = None, series_uid: str | None = None
    ) -> list[Instance]:
        return self._instances(
            study_uids=[study_uid] if study_uid else None,
            series_uids=[series_uid] if series_uid else None,
        )

    def instances_where(
        self,
        *,
        patient_ids: list[str] | None = None,
        study_uids: list[str] | None = None,
        series_uids: list[str] | None = None,
        sop_uids: list[str] | None = None,
    ) -> list[Instance]:
        """Instances named by unique keys (C-GET/C-MOVE), in study/series/number order."""
        return self._instances(
            patient_ids=patient_ids,
            study_uids=study_uids,
            series_uids=series_uids,
            sop_uids=sop_uids,
        )

    def _instances(self, **keys: list[str] | None) -> list[Instance]:
        columns = {
            "patient_ids": Patient.patient_id,
            "study_uids": Study.study_instance_uid,
            "series_uids": Series.series_instance_uid,
            "sop_uids": Instance.sop_instance_uid,
        }
        with self.reading() as s:
            query = (
                select(Instance)
                .join(Series)
                .join(Study)
                .join(Patient)
                .options(
                    joinedload(Instance.series).joinedload(Series.study), joinedload(Instance.blob)
                )
                .order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
            )
            for key, values in keys.items():
                if values:
                    query = query.where(uid_in(columns[key], values))
            return list(s.scalars(query))

    def instance_by_uid(self, sop_uid: str) -> Instance | None:
        """One instance by its SOP Instance UID, with its blob, series and study, read with
        one Core statement and handed back as transient mapped objects. Why not the ORM
        query of `_instances`: a web viewer asks one frame per request, and that query's
        joined loads and identity map were a quarter of a frame's time (bench/dicomweb.py)."""
        with self.engine.connect() as conn:
            found = conn.execute(_BY_UID, {"sop": sop_uid}).first()
        return None if found is None else _transient(found._mapping)

    def instances_by_series_uid(self, series_uid: str) -> list[Instance]:
        """Every instance of one series as instance_by_uid reads one, in one statement: a
        viewer then asks each of their frames in a request of its own."""
        with self.engine.connect() as conn:
            rows = conn.execute(_BY_SERIES_UID, {"series": series_uid}).all()
        return [_transient(row._mapping) for row in rows]

    def mark_accessed(self, instance_ids: list[int]) -> None:
        """When these instances were last retrieved: a tier policy's `accessed` age."""
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id.in_(instance_ids))
                .values(accessed_at=utcnow())
            )


def _transient(row: Any) -> Instance:
    """A joined row as transient mapped objects (never attached to a session)."""
    study = Study(id=row["study_pk"], study_instance_uid=row["study_instance_uid"])
    series = Series(
        id=row["series_pk"],
        series_instance_uid=row["series_instance_uid"],
        study_pk=row["study_pk"],
        study=study,
    )
    blob = Blob(
        id=row["blob_pk"],
        tier=row["tier"],
        path=row["path"],
        kind=row["kind"],
        size=row["size"],
        checksum=row["blob_checksum"],
    )
    return Instance(**{c.key: row[c] for c in _INSTANCE.c}, series=series, blob=blob)
