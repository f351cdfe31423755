"""Patient rows (schema.Patient says how studies are grouped): the row a study's patient
attributes name, the PatientID conflicts that a second name under one PatientID raises, and
the backfill that gives an upgraded index's studies the patient attributes of their objects."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from compacs.service.storage.index.attributes import _patient_values, _study_patient_values
from compacs.service.storage.index.engine import Connections
from compacs.service.storage.index.tables import _PATIENT, _STUDY
from compacs.service.storage.schema import (
    PATIENT_BACKFILLED,
    PATIENT_UNREADABLE,
    Instance,
    Series,
    patient_identity,
)

# pg_advisory_xact_lock's first key for patient-ID locks (schema's migration lock is a
# one-key lock: another space)
_PATIENT_LOCK_CLASS = 0x636F6D70  # "comp"


def _patient_for(conn: Connection, patient: dict[str, Any], study_uid: str) -> int:
    """The patient row (schema.Patient) for these attributes, created when missing; a new
    row under a PatientID that already has one flags them all as a conflict."""
    identity = patient_identity(
        patient["patient_id"],
        patient["issuer_of_patient_id"],
        patient["patient_name"],
        patient["patient_birth_date"],
        study_uid,
    )
    row_id = conn.execute(select(_PATIENT.c.id).where(_PATIENT.c.identity == identity)).scalar()
    if row_id is not None:
        return row_id
    values = {k: v for k, v in patient.items() if k != "other_patient_ids"}
    try:
        with conn.begin_nested():
            row_id = conn.execute(
                insert(_PATIENT).values(**values, identity=identity)
            ).inserted_primary_key[0]
    except IntegrityError:  # another process was first
        row_id = conn.execute(select(_PATIENT.c.id).where(_PATIENT.c.identity == identity)).scalar()
        if row_id is None:
            raise
        return row_id
    _mark_conflicts(conn, patient["patient_id"], patient["issuer_of_patient_id"])
    return row_id


def _same_patient_id(patient_id: str, issuer: str | None) -> Any:
    same_issuer = (
        _PATIENT.c.issuer_of_patient_id.is_(None)
        if issuer is None
        else _PATIENT.c.issuer_of_patient_id == issuer
    )
    return (_PATIENT.c.patient_id == patient_id) & same_issuer


def _mark_conflicts(conn: Connection, patient_id: str, issuer: str | None) -> None:
    """Flag every row of a PatientID (+ issuer) when it has more than one (a name or birth
    date differs: schema.patient_identity), unflag a row left alone. Objects without a
    PatientID each have a row of their own: never a conflict."""
    if not patient_id:
        return
    if conn.dialect.name == "postgresql":
        # Several processes may add names under one PatientID at once, and each would count
        # only its own uncommitted row: one at a time per PatientID (+ issuer) until commit,
        # so the later count sees the earlier row (READ COMMITTED reads anew per statement).
        # SQLite serialises every writer already.
        conn.execute(
            func.pg_advisory_xact_lock(
                _PATIENT_LOCK_CLASS, func.hashtext(f"{patient_id}\\{issuer or ''}")
            )
        )
    group = _same_patient_id(patient_id, issuer)
    rows = conn.scalar(select(func.count(_PATIENT.c.id)).where(group))
    conn.execute(_PATIENT.update().where(group).values(patient_id_conflict=rows > 1))


def _leave_patient(conn: Connection, patient_pk: int) -> None:
    """A study moved to another patient row: drop the old row if no study is left on it (a
    PATIENT-level C-FIND must not answer a name nobody has any more), and re-check its
    PatientID's conflict."""
    old = conn.execute(
        select(_PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id).where(
            _PATIENT.c.id == patient_pk
        )
    ).first()
    if old is None:
        return
    left = conn.scalar(select(func.count(_STUDY.c.id)).where(_STUDY.c.patient_pk == patient_pk))
    if not left:
        conn.execute(_PATIENT.delete().where(_PATIENT.c.id == patient_pk))
    _mark_conflicts(conn, old.patient_id, old.issuer_of_patient_id)


class PatientBackfill(Connections):
    """Revision 0007's backfill, which `compacs db upgrade` runs (backfill.py): studies of an
    older index, where studies under one PatientID shared one name, read their patient
    attributes from one of their stored objects."""

    def studies_to_backfill(self, limit: int) -> list[tuple[int, str]]:
        """Studies (id, Study Instance UID) of an upgraded index whose patient attributes
        still wait for `compacs db upgrade` to read them from a stored object."""
        rows = self._rows(
            select(_STUDY.c.id, _STUDY.c.study_instance_uid)
            .where(_STUDY.c.patient_source.is_(None))
            .order_by(_STUDY.c.id)
            .limit(limit)
        )
        return [tuple(row) for row in rows]

    def backfill_pending(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(
                select(func.count(_STUDY.c.id)).where(_STUDY.c.patient_source.is_(None))
            )

    def study_header_sources(self, study_pk: int) -> list[Instance]:
        """The instances of a study to read its patient attributes from, the cheapest first
        (a Part-10 blob of its own before a slice of a series volume, then the smallest)."""
        with self.reading() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .join(Series)
                    .options(joinedload(Instance.blob))
                    .where(Series.study_pk == study_pk)
                    .order_by(Instance.frame_first.is_not(None), Instance.blob_length, Instance.id)
                    .limit(3)
                )
            )

    def backfill_study(self, study_pk: int, ds: Any | None) -> bool:
        """Give an upgraded index's study the patient attributes of `ds` (one of its stored
        objects), or, with None (none could be read), mark it as keeping the old index's
        values. Only a study still waiting is changed (False otherwise), so a re-run after a
        kill, or two at once, never does one twice."""
        with self._write() as conn:
            row = conn.execute(
                select(_STUDY.c.patient_pk, _STUDY.c.study_instance_uid).where(
                    _STUDY.c.id == study_pk, _STUDY.c.patient_source.is_(None)
                )
            ).first()
            if row is None:
                return False
            if ds is None:
                conn.execute(
                    _STUDY.update()
                    .where(_STUDY.c.id == study_pk)
                    .values(patient_source=PATIENT_UNREADABLE)
                )
                return True
            patient = _patient_values(ds)
            patient_pk = _patient_for(conn, patient, row.study_instance_uid)
            conn.execute(
                _STUDY.update()
                .where(_STUDY.c.id == study_pk)
                .values(
                    patient_pk=patient_pk,
                    **_study_patient_values(patient),
                    patient_source=PATIENT_BACKFILLED,
                )
            )
            if patient_pk != row.patient_pk:
                _leave_patient(conn, row.patient_pk)
        return True
