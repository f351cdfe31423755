"""What an administrator does about the objects the node could not handle as usual: list them
(`compacs problems`), acknowledge them (`compacs problems ack`), send parked ones back to
compression (`compacs requeue`).

A *parked* object failed compression [ingest] max_attempts times and is kept as received; a
*flagged* one was kept although non-conformant (validate.py's defects, or compressed pixel
data that does not decode). A *patient-ID conflict* is a PatientID (+ issuer) whose studies
disagree on the name or birth date (each study answers with its own). None of them loses
data, but `compacs verify` lists them all, and a cron health check built on it would fail
for ever: an acknowledgement says "known, leave it", and holds while the problem reads as it
did (storage/index/problems.py `Problem.text`, `PatientProblem.text`).
"""

from __future__ import annotations

import getpass
import os
import socket
from datetime import datetime
from typing import Any

from compacs.service.storage.index import Acknowledged, Index, PatientProblem, Problem
from compacs.service.storage.schema import STATE_PARKED


class SelectionError(ValueError):
    """A selection names nothing that fits; the message says what to do."""


def who() -> str:
    """The default name an acknowledgement or a requeue is recorded under."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def select(
    problems: list[Problem], uids: list[str], studies: list[str], everything: bool
) -> list[Problem]:
    """The problems named by SOP Instance UID or Study Instance UID, or all of them; a UID
    that names none is an error (a typo must not pass as done)."""
    if everything:
        return problems
    if not uids and not studies:
        raise SelectionError("give SOP Instance UIDs, --study UID, or --all")
    by_sop = {p.sop_instance_uid: p for p in problems}
    unknown = [uid for uid in uids if uid not in by_sop]
    if unknown:
        raise SelectionError(
            f"no flagged or parked object has SOP Instance UID {', '.join(unknown)}; "
            "`compacs problems` lists those that do"
        )
    chosen = {uid: by_sop[uid] for uid in uids}
    for study in studies:
        in_study = [p for p in problems if p.study_instance_uid == study]
        if not in_study:
            raise SelectionError(
                f"study {study} holds no flagged or parked object; `compacs problems` lists them"
            )
        chosen.update((p.sop_instance_uid, p) for p in in_study)
    return list(chosen.values())


def select_patients(
    conflicts: list[PatientProblem], patient_ids: list[str], issuer: str | None
) -> list[PatientProblem]:
    """The patient-ID conflicts named by PatientID, under `issuer` ("" for none) or, without
    one, the only conflict of that PatientID: a PatientID with conflicts under several
    issuers is several patient domains, and acknowledging one must not pass the others."""
    chosen: list[PatientProblem] = []
    for patient_id in patient_ids:
        found = [c for c in conflicts if c.patient_id == patient_id]
        if issuer is not None:
            found = [c for c in found if (c.issuer_of_patient_id or "") == issuer]
        if not found:
            under = {None: "", "": " without an issuer"}.get(issuer, f" with issuer {issuer!r}")
            raise SelectionError(
                f"no patient-ID conflict under PatientID {patient_id!r}{under}; "
                "`compacs problems` lists those there are"
            )
        if len(found) > 1:
            issuers = ", ".join(repr(c.issuer_of_patient_id or "") for c in found)
            raise SelectionError(
                f"PatientID {patient_id!r} has conflicts under several issuers ({issuers}): "
                "give --issuer (--issuer '' for the one without an issuer)"
            )
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def acknowledge(
    index: Index,
    uids: list[str],
    studies: list[str],
    everything: bool,
    by: str,
    note: str | None,
    patient_ids: list[str] | None = None,
    issuer: str | None = None,
) -> list[Problem | PatientProblem]:
    """Acknowledge the selected problems as they read now (objects by SOP or study UID,
    patient-ID conflicts by PatientID, or everything); the ones acknowledged."""
    patient_ids = patient_ids or []
    if issuer is not None and not patient_ids:
        raise SelectionError("--issuer names the issuer of a --patient ID: give --patient too")
    if not (uids or studies or patient_ids or everything):
        raise SelectionError("give SOP Instance UIDs, --study UID, --patient ID, or --all")
    chosen: list[Problem | PatientProblem] = []
    if uids or studies or everything:
        chosen.extend(select(index.problems(), uids, studies, everything))
    conflicts = index.patient_problems()
    chosen.extend(conflicts if everything else select_patients(conflicts, patient_ids, issuer))
    index.acknowledge(chosen, by, note)
    return chosen


def requeue(index: Index, uids: list[str], studies: list[str], everything: bool, by: str) -> int:
    """Send the selected parked objects back to compression with their attempts reset."""
    parked = [p for p in index.problems() if p.state == STATE_PARKED]
    try:
        chosen = select(parked, uids, studies, everything)
    except SelectionError as exc:
        raise SelectionError(str(exc).replace("flagged or parked", "parked")) from None
    return index.requeue([p.sop_instance_uid for p in chosen], by) if chosen else 0


def as_json(problem: Problem) -> dict[str, Any]:
    return {
        "sop_instance_uid": problem.sop_instance_uid,
        "study_instance_uid": problem.study_instance_uid,
        "state": problem.state,
        "parked": problem.state == STATE_PARKED,
        "attempts": problem.attempts,
        "last_error": problem.last_error,
        "defects": problem.defects,
        "blob": problem.blob_path,
        "acknowledged": _ack_json(problem.acknowledged),
    }


def patient_as_json(problem: PatientProblem) -> dict[str, Any]:
    return {
        "patient_id": problem.patient_id,
        "issuer_of_patient_id": problem.issuer_of_patient_id,
        "patients": [
            {
                "patient_name": c.patient_name,
                "patient_birth_date": c.patient_birth_date,
                "studies": c.studies,
                "a_study": c.a_study,
            }
            for c in problem.names
        ],
        "reason": problem.reason,
        "acknowledged": _ack_json(problem.acknowledged),
    }


def _ack_json(ack: Acknowledged | None) -> dict[str, Any] | None:
    return None if ack is None else {"by": ack.by, "at": ack.at.isoformat(), "note": ack.note}


def table(problems: list[Problem]) -> list[str]:
    """One line per problem, the reason last and whole (it is what the reader needs)."""
    rows = [("SOP INSTANCE UID", "STATE", "ACKNOWLEDGED", "REASON")]
    rows.extend((p.sop_instance_uid, p.state, _acked(p.acknowledged), p.text) for p in problems)
    return _aligned(rows)


def patient_table(conflicts: list[PatientProblem]) -> list[str]:
    """One line per PatientID (+ issuer) whose studies disagree, the names and their study
    counts as the reason."""
    rows = [("PATIENT ID", "ISSUER", "ACKNOWLEDGED", "REASON")]
    rows.extend(
        (c.patient_id, c.issuer_of_patient_id or "-", _acked(c.acknowledged), c.reason)
        for c in conflicts
    )
    return _aligned(rows)


def _acked(ack: Acknowledged | None) -> str:
    return "-" if ack is None else f"{ack.by} {_when(ack.at)}"


def _aligned(rows: list[tuple[str, str, str, str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [
        "  ".join([*(v.ljust(w) for v, w in zip(row[:3], widths, strict=True)), row[3]])
        for row in rows
    ]


def summary(problems: list[Problem], conflicts: list[PatientProblem]) -> str:
    parked = sum(p.state == STATE_PARKED for p in problems)
    flagged = sum(bool(p.defects) for p in problems)
    everything = [*problems, *conflicts]
    acked = sum(p.acknowledged is not None for p in everything)
    return (
        f"{len(everything)} problem(s): {parked} parked, {flagged} flagged, "
        f"{len(conflicts)} patient-ID conflict(s), {acked} acknowledged"
        + (
            "\n(`compacs problems ack UID...` or `--patient ID` acknowledges; "
            "`compacs requeue UID...` sends parked ones back to compression)"
            if len(everything) > acked
            else ""
        )
    )


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M")
