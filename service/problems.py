"""What an administrator does about the objects the node could not handle as usual: list them
(`compacs problems`), acknowledge them (`compacs problems ack`), send parked ones back to
compression (`compacs requeue`).

A *parked* object failed compression [ingest] max_attempts times and is kept as received; a
*flagged* one was kept although non-conformant (validate.py's defects, or compressed pixel
data that does not decode). Neither loses data, but `compacs verify` lists both, and a cron
health check built on it would fail for ever: an acknowledgement says "known, leave it", and
holds while the problem reads as it did (index.py `Problem.text`).
"""

from __future__ import annotations

import getpass
import os
import socket
from datetime import datetime
from typing import Any

from compacs.service.storage.index import Index, Problem
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


def acknowledge(
    index: Index, uids: list[str], studies: list[str], everything: bool, by: str, note: str | None
) -> list[Problem]:
    """Acknowledge the selected problems as they read now; the ones acknowledged."""
    chosen = select(index.problems(), uids, studies, everything)
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
    ack = problem.acknowledged
    return {
        "sop_instance_uid": problem.sop_instance_uid,
        "study_instance_uid": problem.study_instance_uid,
        "state": problem.state,
        "parked": problem.state == STATE_PARKED,
        "attempts": problem.attempts,
        "last_error": problem.last_error,
        "defects": problem.defects,
        "blob": problem.blob_path,
        "acknowledged": None
        if ack is None
        else {"by": ack.by, "at": ack.at.isoformat(), "note": ack.note},
    }


def table(problems: list[Problem]) -> list[str]:
    """One line per problem, the reason last and whole (it is what the reader needs)."""
    rows = [("SOP INSTANCE UID", "STATE", "ACKNOWLEDGED", "REASON")]
    for p in problems:
        ack = p.acknowledged
        rows.append(
            (
                p.sop_instance_uid,
                p.state,
                "-" if ack is None else f"{ack.by} {_when(ack.at)}",
                p.text,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [
        "  ".join([*(v.ljust(w) for v, w in zip(row[:3], widths, strict=True)), row[3]])
        for row in rows
    ]


def summary(problems: list[Problem]) -> str:
    parked = sum(p.state == STATE_PARKED for p in problems)
    flagged = sum(bool(p.defects) for p in problems)
    acked = sum(p.acknowledged is not None for p in problems)
    return (
        f"{len(problems)} problem(s): {parked} parked, {flagged} flagged, {acked} acknowledged"
        + (
            "\n(`compacs problems ack UID...` acknowledges; `compacs requeue UID...` sends parked"
            " ones back to compression)"
            if len(problems) > acked
            else ""
        )
    )


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M")
