"""Offline jobs on a node's data folder: export, verify.

They go through the archive service (opened without compression jobs, no network), so an
administrator can run them while the node is stopped, or beside it: reads never block the
node's writer (SQLite WAL), and files a live node is still writing are not orphans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from tqdm import tqdm

from compacs.service import wire
from compacs.service.archive_service import ArchiveService
from compacs.service.compress import NOT_A_CODEC_FAILURE, source_frames
from compacs.service.storage.archive import uid_hash
from compacs.service.storage.index import Instance, patient_label
from compacs.service.storage.schema import STATE_PARKED
from compacs.service.syntaxes import EXPLICIT_LE, is_private
from compacs.service.transcode import transcode
from compacs.service.validate import is_valid_uid

log = logging.getLogger("compacs.maintenance")


AS_STORED = "stored"  # export target: the stored bytes (our private syntaxes decoded)
# The export target when none is asked for: explicit VR little endian, which every reader
# takes; an object whose pixel data does not decode is then written as stored and listed.
DEFAULT = EXPLICIT_LE


@dataclass(frozen=True)
class Failure:
    """One object a bulk job could not handle; the job goes on and lists it at the end."""

    sop_instance_uid: str
    blob_path: str
    reason: str

    def __str__(self) -> str:
        return f"SOP {self.sop_instance_uid} ({self.blob_path}): {self.reason}"


@dataclass
class ExportReport:
    written: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # written as stored instead of in the default syntax, and why (written, not failed)
    as_stored: list[Failure] = field(default_factory=list)


def export(
    service: ArchiveService,
    instances: list[Instance],
    out_dir: Path,
    target: str | None = None,
    progress: bool = True,
) -> ExportReport:
    """Write each instance as a Part-10 file <out>/<study>/<series>/<sop>.dcm in `target`
    (a transfer syntax UID, or AS_STORED), going on past the ones that fail (invariant 7).

    No `target` (None): DEFAULT, except for an object that cannot be given in it (its
    pixel data does not decode): that one is written as stored, and listed in
    `as_stored` with the reason. An explicit `target` the object cannot be given in is a
    failure of that object alone. A big object is read, decoded and written frame by frame
    from its blob file (wire.streamed) where it is as stored or decoded to explicit VR
    little endian, never held whole.

    File names are UIDs: only those of digits and dots, as the node keeps UIDs with other
    characters too (flagged) and those must not become paths; the others get a hash.
    """
    report = ExportReport()
    for inst in tqdm(instances, desc="export", unit="obj", disable=not progress):
        series = inst.series
        path = (
            out_dir
            / _file_name(series.study.study_instance_uid)
            / _file_name(series.series_instance_uid)
            / f"{_file_name(inst.sop_instance_uid)}.dcm"
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            why = _export_one(service, inst, path, target)
            report.written.append(path)
            if why is not None:
                report.as_stored.append(Failure(inst.sop_instance_uid, inst.blob.path, why))
        except BaseException as exc:
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            path.unlink(missing_ok=True)
            report.failures.append(Failure(inst.sop_instance_uid, inst.blob.path, _reason(exc)))
    return report


def _export_one(
    service: ArchiveService, inst: Instance, path: Path, target: str | None
) -> str | None:
    """Write one instance; None, or why it was written as stored instead of DEFAULT."""
    stored = inst.stored_transfer_syntax
    syntax = DEFAULT if target is None else target
    if syntax == AS_STORED:
        syntax = EXPLICIT_LE if is_private(stored) else stored  # private never leaves
    try:
        _write_in(service, inst, path, syntax)
        return None
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        # a blob that cannot be read, an asked-for syntax, a private one: the object fails
        if isinstance(exc, OSError) or target is not None or syntax == stored or is_private(stored):
            raise
        path.unlink(missing_ok=True)
        why = exc
    _write_in(service, inst, path, stored)
    return f"written as stored ({UID(stored).name}): not in {UID(syntax).name}: {_reason(why)}"


def _write_in(service: ArchiveService, inst: Instance, path: Path, syntax: str) -> None:
    """One instance as a Part-10 file in `syntax`; streamed from its blob when it is big."""
    streaming = wire.stream_stored(service.open_instance, inst, syntax)
    if streaming is not None:
        try:
            wire.write_part10(streaming, path)
        finally:
            streaming.close()
        return
    path.write_bytes(transcode(service.read_instance(inst), syntax))


def _file_name(uid: str) -> str:
    return uid if is_valid_uid(uid) else f"uid-{uid_hash(uid)}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "blob missing"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def verify(service: ArchiveService, progress: bool = True) -> list[str]:
    """Every problem found: bad checksums, undecodable blobs, missing blobs, orphans, and the
    objects the index flags (kept although non-conformant) or parked (compression failed),
    and each name under a PatientID whose studies disagree (patient_id_conflict), unless an
    administrator acknowledged them as they read now (`compacs problems ack`): so
    verify can serve as a health check. An object kept as received that does not decode is
    flagged (here, where the index predates its job's check), not a second problem; a
    checksum failure is never acknowledged.
    A file younger than a claim's lease may be a live node's write in progress: not an
    orphan yet."""
    failures: list[str] = []
    for inst in tqdm(service.index.instances(), desc="verify", unit="obj", disable=not progress):
        try:
            ds = dcmread(BytesIO(service.read_instance(inst)))
            if "PixelData" in ds:
                source_frames(ds)
        except BaseException as exc:
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            if not isinstance(exc, OSError) and inst.codec == "passthrough":
                if not inst.defects:  # indexed before arrivals were decoded: flag it now
                    reason = f"pixel data does not decode: {_reason(exc)}".splitlines()[0]
                    service.add_flag(inst.id, reason)
                    service.audit("nonconformant", sop_uid=inst.sop_instance_uid,
                                        detail=f"{reason} (found by verify)")  # fmt: skip
                continue  # flagged as received: listed with its flag below
            failures.append(
                str(Failure(inst.sop_instance_uid, inst.blob.path, _verify_reason(exc)))
            )
    for problem in service.index.problems():
        if problem.acknowledged is not None:
            continue
        where = f"SOP {problem.sop_instance_uid} ({problem.blob_path})"
        if problem.state == STATE_PARKED:
            failures.append(f"{where}: parked, compression failed: {problem.last_error}")
        if problem.defects:
            failures.append(f"{where}: kept as received, flagged: {problem.defects}")
    failures.extend(
        f"patient_id_conflict: {patient_label(conflict)} has studies that disagree; named"
        f" {c.patient_name!r}, born {c.patient_birth_date or '(none)'}: {c.studies} studies"
        f" (e.g. {c.a_study})"
        for conflict in service.index.patient_problems()
        if conflict.acknowledged is None
        for c in conflict.names
    )
    failures.extend(
        f"orphan blob {path} (tier {tier}): on disk but in no index row"
        for tier, path in service.orphan_blobs()
    )
    failures.extend(
        f"fixity: blob {path} (tier {tier}) failed its last check: {error}"
        for tier, path, error in service.index.fixity_failures()
    )
    return failures


def _verify_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):  # a missing blob, a checksum mismatch, an I/O error
        return _reason(exc) if isinstance(exc, FileNotFoundError) else str(exc)
    return f"does not decode: {_reason(exc)}"
