"""Problems an administrator should hear of (problems.py at the top of the service says what
they are and what is done about them): flagged and parked instances, PatientIDs whose studies
disagree on the patient, studies the 0007 backfill could not re-read; and the
acknowledgements and re-queueing that answer them, each audited."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import bindparam, func, insert, select

from compacs.service.storage.index.engine import Connections
from compacs.service.storage.index.tables import (
    _ACK,
    _AUDIT,
    _BLOB,
    _INSTANCE,
    _PATIENT,
    _SERIES,
    _STUDY,
)
from compacs.service.storage.schema import (
    ACK_PATIENT,
    KIND_INSTANCE,
    PATIENT_UNREADABLE,
    STATE_PARKED,
    STATE_PENDING,
    patient_conflict_subject,
    utcnow,
)


class Acknowledged(NamedTuple):
    """Who acknowledged a problem, when, and what they noted."""

    by: str
    at: datetime
    note: str | None


class Problem(NamedTuple):
    """An instance an administrator should hear of: flagged defects, or parked."""

    sop_instance_uid: str
    blob_path: str
    state: str
    defects: str | None
    last_error: str | None
    study_instance_uid: str = ""
    attempts: int = 0
    # the acknowledgement in force: None when there is none, or the problem changed since
    acknowledged: Acknowledged | None = None

    @property
    def text(self) -> str:
        """The problem in one line, as acknowledgements record it."""
        parts = [f"parked: {self.last_error}"] if self.state == STATE_PARKED else []
        if self.defects:
            parts.append(f"flagged: {self.defects}")
        return "; ".join(parts)


class PatientConflict(NamedTuple):
    """One name (and birth date) under a PatientID that has others: verify lists them."""

    patient_id: str
    issuer_of_patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    studies: int
    a_study: str  # one of its Study Instance UIDs, to look it up


class PatientProblem(NamedTuple):
    """A PatientID (+ issuer) whose studies disagree on the name or birth date, as
    `compacs problems` lists it and `compacs problems ack --patient` acknowledges it: one
    problem however many names it has."""

    patient_id: str
    issuer_of_patient_id: str | None
    names: tuple[PatientConflict, ...]  # one per name and birth date, as verify lists them
    # the acknowledgement in force: None when there is none, or a name came or went since
    acknowledged: Acknowledged | None = None

    @property
    def text(self) -> str:
        """The names and birth dates, as acknowledgements record it. Not the study counts: a
        new study of a name already known is no new conflict, a new name is."""
        names = (f"{_name(c)} born {c.patient_birth_date or '(none)'}" for c in self.names)
        return "; ".join(sorted(names))

    @property
    def reason(self) -> str:
        """The conflict in one line, with each name's studies (and one of them to look up)."""
        return f"{len(self.names)} patients under one PatientID: " + "; ".join(
            f"{_name(c)} born {c.patient_birth_date or '(none)'}, {c.studies} "
            f"{'study' if c.studies == 1 else 'studies'} (e.g. {c.a_study})"
            for c in sorted(self.names, key=lambda c: (_name(c), c.patient_birth_date or ""))
        )


def _name(conflict: PatientConflict) -> str:
    """A patient name as a conflict reads it: trailing empty components make no other person
    (schema.patient_identity), and a missing name is said so."""
    name = (conflict.patient_name or "").rstrip("^ ")
    return repr(name) if name else "(no name)"


def patient_label(problem: PatientProblem) -> str:
    """How a PatientID (+ issuer) is named to an administrator."""
    issuer = problem.issuer_of_patient_id
    return f"PatientID {problem.patient_id!r}" + (f" (issuer {issuer!r})" if issuer else "")


class Problems(Connections):
    """The problems listed, flagged, acknowledged and re-queued."""

    def problems(self) -> list[Problem]:
        """Flagged and parked instances with the acknowledgement in force on each (verify,
        `compacs problems`)."""
        rows = self._rows(
            select(
                _INSTANCE.c.sop_instance_uid,
                _BLOB.c.path,
                _INSTANCE.c.state,
                _INSTANCE.c.defects,
                _INSTANCE.c.last_error,
                _STUDY.c.study_instance_uid,
                _INSTANCE.c.attempts,
                _ACK.c.problem,
                _ACK.c.acknowledged_by,
                _ACK.c.acknowledged_at,
                _ACK.c.note,
            )
            .select_from(
                _INSTANCE.join(_BLOB)
                .join(_SERIES)
                .join(_STUDY)
                .outerjoin(
                    _ACK,
                    (_ACK.c.kind == KIND_INSTANCE)
                    & (_ACK.c.subject == _INSTANCE.c.sop_instance_uid),
                )
            )
            .where(_INSTANCE.c.defects.is_not(None) | (_INSTANCE.c.state == STATE_PARKED))
            .order_by(_INSTANCE.c.id)
        )
        problems = []
        for *fields, acked_text, by, at, note in rows:
            problem = Problem(*fields)
            if acked_text is not None and acked_text == problem.text:
                problem = problem._replace(acknowledged=Acknowledged(by, at, note))
            problems.append(problem)
        return problems

    def add_flag(self, instance_pk: int, defect: str) -> None:
        """Flag an instance found non-conformant after ingest (verify, on an index older than
        the flagging of undecodable arrivals), its defect added to any it has."""
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id == instance_pk)
                .values(defects=func.coalesce(_INSTANCE.c.defects + "; ", "") + defect)
            )

    def patient_conflicts(self) -> list[PatientConflict]:
        """PatientIDs (with issuer) whose studies disagree on the name or birth date: one entry
        per patient row, for verify."""
        rows = self._rows(
            select(
                _PATIENT.c.patient_id,
                _PATIENT.c.issuer_of_patient_id,
                _PATIENT.c.patient_name,
                _PATIENT.c.patient_birth_date,
                func.count(_STUDY.c.id),
                func.min(_STUDY.c.study_instance_uid),
            )
            .select_from(_PATIENT.join(_STUDY, _STUDY.c.patient_pk == _PATIENT.c.id))
            .where(_PATIENT.c.patient_id_conflict.is_(True))
            .group_by(_PATIENT.c.id)
            .order_by(_PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id, _PATIENT.c.id)
        )
        return [PatientConflict(*row) for row in rows]

    def patient_problems(self) -> list[PatientProblem]:
        """patient_conflicts() grouped by PatientID (+ issuer), with the acknowledgement in
        force on each (verify, `compacs problems`)."""
        groups: dict[tuple[str, str | None], list[PatientConflict]] = {}
        for conflict in self.patient_conflicts():
            key = (conflict.patient_id, conflict.issuer_of_patient_id)
            groups.setdefault(key, []).append(conflict)
        with self.engine.connect() as conn:
            acks = {
                subject: (text, Acknowledged(by, at, note))
                for subject, text, by, at, note in conn.execute(
                    select(
                        _ACK.c.subject,
                        _ACK.c.problem,
                        _ACK.c.acknowledged_by,
                        _ACK.c.acknowledged_at,
                        _ACK.c.note,
                    ).where(_ACK.c.kind == ACK_PATIENT)
                )
            }
        problems = []
        for (patient_id, issuer), names in groups.items():
            problem = PatientProblem(patient_id, issuer, tuple(names))
            acked_text, acked = acks.get(patient_conflict_subject(patient_id, issuer), (None, None))
            if acked_text == problem.text:
                problem = problem._replace(acknowledged=acked)
            problems.append(problem)
        return problems

    def patient_unverified_studies(self) -> list[tuple[str, str | None, str | None]]:
        """(Study Instance UID, PatientID, PatientName) of each study whose patient attributes
        `compacs db upgrade` could not read from any of its objects (revision 0007's
        backfill): before 0007 studies under one PatientID shared one name, so these may
        answer with another study's patient. `compacs problems` lists them."""
        rows = self._rows(
            select(_STUDY.c.study_instance_uid, _PATIENT.c.patient_id, _STUDY.c.patient_name)
            .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
            .where(_STUDY.c.patient_source == PATIENT_UNREADABLE)
            .order_by(_STUDY.c.study_instance_uid)
        )
        return [(uid, pid or None, name) for uid, pid, name in rows]

    def acknowledge(
        self, problems: Sequence[Problem | PatientProblem], by: str, note: str | None
    ) -> None:
        """Record that `by` knows these problems as they read now; audited one by one."""
        now = utcnow()
        with self._write() as conn:
            for problem in problems:
                if isinstance(problem, PatientProblem):
                    kind, sop_uid = ACK_PATIENT, None
                    subject = patient_conflict_subject(
                        problem.patient_id, problem.issuer_of_patient_id
                    )
                    what = f"{patient_label(problem)}: {problem.reason}"
                else:
                    kind, sop_uid = KIND_INSTANCE, problem.sop_instance_uid
                    subject, what = problem.sop_instance_uid, problem.text
                conn.execute(
                    _ACK.delete().where((_ACK.c.kind == kind) & (_ACK.c.subject == subject))
                )
                conn.execute(
                    insert(_ACK).values(
                        kind=kind,
                        subject=subject,
                        problem=problem.text,
                        acknowledged_by=by[:80],
                        acknowledged_at=now,
                        note=note,
                    )
                )
                conn.execute(
                    insert(_AUDIT).values(
                        at=now,
                        kind="acknowledged",
                        sop_instance_uid=sop_uid,
                        detail=f"by {by}: {what}" + (f" (note: {note})" if note else ""),
                    )
                )

    def requeue(self, sop_uids: list[str], by: str) -> int:
        """Send parked instances back to pending with no attempts counted and no claim, so a
        node takes them at its next recovery pass (or start); their acknowledgements end
        with the problem. The version moves on: a parked row has no job whose late result
        could still land, but compare-and-swap never relies on that."""
        now = utcnow()
        parked = (_INSTANCE.c.state == STATE_PARKED) & _INSTANCE.c.sop_instance_uid.in_(
            bindparam("uids", expanding=True)
        )
        with self._write() as conn:
            requeued = [
                row[0]
                for row in conn.execute(
                    _INSTANCE.update()
                    .where(parked)
                    .values(
                        state=STATE_PENDING,
                        attempts=0,
                        last_error=None,
                        claimed_by=None,
                        lease_until=None,
                        version=_INSTANCE.c.version + 1,
                    )
                    .returning(_INSTANCE.c.sop_instance_uid),
                    {"uids": sop_uids},
                )
            ]
            if requeued:
                conn.execute(
                    _ACK.delete().where(_ACK.c.kind == KIND_INSTANCE, _ACK.c.subject.in_(requeued))
                )
                conn.execute(
                    insert(_AUDIT),
                    [
                        {"at": now, "kind": "requeued", "sop_instance_uid": uid, "detail": by}
                        for uid in requeued
                    ],
                )
            return len(requeued)
