"""Importing a study from another PACS (`compacs pull`): C-MOVE to a destination the
remote knows, or C-GET with each object C-STOREd on to the destination as it arrives.

Orthanc answers a C-GET in the syntax of a context it accepted, and with several syntaxes
in one context it picks the uncompressed one: so the C-GET proposes one presentation
context per transfer syntax for the study's SOP classes, and objects come as they are
stored. Orthanc answers 0xA801 to a C-MOVE whose destination it does not know: the error
says what to add where.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

from compacs.service.dimse.scu.associations import (
    MAX_CONTEXTS,
    NATIVE_PAIR,
    accepted,
    associate,
    echo,
    release,
)
from compacs.service.dimse.scu.errors import (
    STATUS_MOVE_DESTINATION_UNKNOWN,
    STATUS_OUT_OF_RESOURCES,
    NoContextError,
    ScuError,
    abort_hint,
    status_of,
    status_text,
)
from compacs.service.dimse.scu.find import answer_value, build_identifier, find
from compacs.service.dimse.scu.peers import Peer
from compacs.service.dimse.scu.progress import Progress, Step, tell
from compacs.service.dimse.scu.send import DicomFile, StoreResult, class_contexts, store_file
from compacs.service.dimse.scu.switches import receive_to_files, send_files_undecoded

# Compressed syntaxes a study may hold, for the one-context-per-syntax C-GET proposal;
# lossless first. The syntaxes a peer cannot handle are simply not accepted by it.
GET_COMPRESSED = [
    UID("1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    UID("1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    UID("1.2.840.10008.1.2.4.201"),  # HTJ2K lossless
    UID("1.2.840.10008.1.2.5"),  # RLE lossless
    UID("1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    UID("1.2.840.10008.1.2.4.57"),  # JPEG lossless
    UID("1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
    UID("1.2.840.10008.1.2.4.91"),  # JPEG 2000
    UID("1.2.840.10008.1.2.4.50"),  # JPEG baseline
    UID("1.2.840.10008.1.2.4.51"),  # JPEG extended
]
# One context for each of the other storage classes (the peer picks one of these).
GET_COMMON_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID("1.2.840.10008.1.2.4.80"),
    UID("1.2.840.10008.1.2.4.90"),
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]


@dataclass
class PullReport:
    study_uid: str
    via: str
    completed: int = 0
    failed: int = 0
    warning: int = 0
    final_status: int | None = None
    expected: int | None = None  # NumberOfStudyRelatedInstances from the remote, if told
    forward_failures: list[str] = field(default_factory=list)  # C-GET: instance: why
    final_comment: str = ""  # Error Comment of a failed final response

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and not self.forward_failures
            and self.final_status in (0x0000, 0xB000)
            and (self.final_status == 0x0000 or self.warning > 0)
        )


class _Tally:
    """The sub-operations done so far and of how many, for the caller's `progress`, which
    also hears of failures between two responses (a C-GET object not stored on)."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self.progress, self.done, self.total = progress, 0, total

    def update(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total if total is not None else self.total
        tell(self.progress, Step(self.done, self.total))

    def note(self, line: str, *, failure: bool = False) -> None:
        tell(self.progress, Step(self.done, self.total, line, failure))


def study_info(peer: Peer, calling_ae: str, study_uid: str) -> tuple[int | None, list[str]]:
    """(number of instances, SOP classes) of the study at `peer`, ScuError if it has none.

    Peers that do not offer C-FIND, or do not fill these keys, give (None, [])."""
    keys = [
        ("StudyInstanceUID", study_uid),
        ("NumberOfStudyRelatedInstances", None),
        ("SOPClassesInStudy", None),
    ]
    try:
        answers = find(peer, calling_ae, "STUDY", keys)
    except NoContextError:
        return None, []
    if not answers:
        raise ScuError(f"{peer} has no study with Study Instance UID {study_uid}")
    counts: list[int] = []
    classes: list[str] = []
    for ds in answers:  # one per patient, should the remote key studies by patient
        count = answer_value(ds, "NumberOfStudyRelatedInstances")
        if isinstance(count, str) and count.strip().isdigit():
            counts.append(int(count))
        uids = answer_value(ds, "SOPClassesInStudy") or []
        classes += [uids] if isinstance(uids, str) else uids
    total = sum(counts) if len(counts) == len(answers) else None
    return total, list(dict.fromkeys(uid for uid in classes if uid))


def get_contexts(study_classes: Sequence[str]) -> tuple[list[PresentationContext], list]:
    """Storage contexts (and SCP role selections) for a C-GET, with the Get context first.

    The study's SOP classes (from C-FIND, when the peer told) get one context per syntax,
    so that compressed objects come as they are stored; the other storage classes of
    pynetdicom's list fill the rest, one context each with several syntaxes."""
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet, NATIVE_PAIR)]
    budget = MAX_CONTEXTS - len(contexts)
    per_class: list[list[UID]] = [NATIVE_PAIR, *([ts] for ts in GET_COMPRESSED)]
    if len(study_classes) * len(per_class) > budget:
        per_class = [NATIVE_PAIR, [GET_COMPRESSED[0]], [GET_COMPRESSED[1]]]
    if len(study_classes) * len(per_class) > budget:
        per_class = [GET_COMMON_SYNTAXES]
    classes = list(dict.fromkeys(study_classes))[: budget // len(per_class)]
    for uid in classes:
        contexts.extend(build_context(uid, syntaxes) for syntaxes in per_class)
    for cx in StoragePresentationContexts:
        if len(contexts) >= MAX_CONTEXTS:
            break
        if cx.abstract_syntax not in classes:
            contexts.append(build_context(cx.abstract_syntax, GET_COMMON_SYNTAXES))
            classes.append(cx.abstract_syntax)
    roles = [build_role(uid, scp_role=True) for uid in classes]
    return contexts, roles


class Forwarder:
    """C-STOREs received files to one peer as they come, on one association that is opened
    again with more contexts when an object of a new (SOP class, syntax) pair arrives."""

    def __init__(self, calling_ae: str, peer: Peer) -> None:
        self.calling_ae = calling_ae
        self.peer = peer
        self.pairs: dict[tuple[str, str], None] = {}
        self.assoc: Association | None = None
        self.accepted: set[tuple[str, str]] = set()
        self.associations = 0

    def _open(self) -> None:
        self.close()
        syntaxes: dict[str, set[str]] = defaultdict(set)
        for sop_class, ts in self.pairs:
            syntaxes[sop_class].add(ts)
        contexts: list[PresentationContext] = []
        for sop_class in reversed(list(syntaxes)):  # the newest first, should it overflow
            more = class_contexts(sop_class, syntaxes[sop_class])
            if len(contexts) + len(more) > MAX_CONTEXTS:
                break
            contexts.extend(more)
        self.assoc = associate(self.calling_ae, self.peer, contexts)
        self.accepted = accepted(self.assoc)
        self.associations += 1

    def forward(self, path: Path, sop_class: str, sop_instance: str, ts: str) -> StoreResult:
        f = DicomFile(path, UID(sop_class), sop_instance, UID(ts))
        pair = (str(sop_class), str(ts))
        if pair not in self.pairs or self.assoc is None or not self.assoc.is_established:
            self.pairs[pair] = None
            self._open()
        assert self.assoc is not None
        return store_file(self.assoc, f, self.accepted)

    def close(self) -> None:
        if self.assoc is not None:
            release(self.assoc)
            self.assoc = None


def _counts(rsp: Dataset) -> tuple[int | None, int | None, int | None, int | None]:
    def get(kw: str) -> int | None:
        value = rsp.get(kw)
        return int(value) if value not in (None, "") else None

    return (
        get("NumberOfRemainingSuboperations"),
        get("NumberOfCompletedSuboperations"),
        get("NumberOfFailedSuboperations"),
        get("NumberOfWarningSuboperations"),
    )


def _follow(
    responses: Iterable[tuple[Dataset, Dataset | None]],
    report: PullReport,
    peer: Peer,
    calling_ae: str,
    what: str,
    table: dict[int, tuple[str, str]],
    tally: _Tally,
) -> None:
    """Track a C-MOVE/C-GET's responses: progress from pending ones, counts from the last."""
    last: tuple[int | None, int, int, int] | None = None
    for rsp, _ident in responses:
        status, comment = status_of(rsp)
        if status is None and last is None:
            raise ScuError(abort_hint(peer, calling_ae, what))
        if status is None:
            raise ScuError(
                f"{peer} ended the association in the middle of the {what} "
                f"({last[1]} sub-operation(s) completed, {last[2]} failed)"
            )
        remaining, completed, failed, warning = _counts(rsp)
        done = [v or 0 for v in (completed, failed, warning)]
        tally.update(sum(done), None if remaining is None else remaining + sum(done))
        if status in (0xFF00, 0xFF01):
            last = (remaining, *done)
            continue
        report.final_status = status
        if completed is None and failed is None and warning is None:
            # no counts in the final response: what the last pending one said, plus what
            # remained (done if the operation succeeded, failed otherwise)
            rest, completed_, failed_, warning_ = last or (0, 0, 0, 0)
            report.completed = completed_ + ((rest or 0) if status == 0x0000 else 0)
            report.failed = failed_ + (0 if status == 0x0000 else (rest or 0))
            report.warning = warning_
        else:
            report.completed, report.failed, report.warning = done
        if status not in (0x0000, 0xB000):
            report.final_comment = comment
            words = status_text(status, table)
            tally.note(
                f"{peer} ended the {what} with {words}" + (f": {comment}" if comment else "")
            )


def pull_move(
    peer: Peer,
    calling_ae: str,
    study_uid: str,
    into: Peer,
    expected: int | None = None,
    progress: Progress | None = None,
) -> PullReport:
    """C-MOVE the study from `peer` to `into` (the remote must know `into`'s AE title)."""
    report = PullReport(study_uid, "move", expected=expected)
    identifier = build_identifier("STUDY", [("StudyInstanceUID", study_uid)])
    contexts = [build_context(StudyRootQueryRetrieveInformationModelMove, NATIVE_PAIR)]
    assoc = associate(calling_ae, peer, contexts)
    try:
        responses = assoc.send_c_move(
            identifier, into.ae_title, StudyRootQueryRetrieveInformationModelMove
        )
        tally = _Tally(progress, expected)
        _follow(responses, report, peer, calling_ae, "C-MOVE", QR_MOVE_SERVICE_CLASS_STATUS, tally)
    finally:
        release(assoc)
    status = report.final_status or 0
    nothing_done = report.completed + report.failed + report.warning == 0
    if status == STATUS_MOVE_DESTINATION_UNKNOWN or (0xC000 <= status <= 0xCFFF and nothing_done):
        words = status_text(status, QR_MOVE_SERVICE_CLASS_STATUS)
        comment = f": {report.final_comment}" if report.final_comment else ""
        guess = "does not know" if status == STATUS_MOVE_DESTINATION_UNKNOWN else "may not know"
        raise ScuError(
            f"{peer} refused the C-MOVE with {words}{comment}. It {guess} the move "
            f"destination {into.ae_title!r}: add that AE title with its host and port to the "
            "remote's DICOM peers (Orthanc: DicomModalities, or PUT /modalities/NAME "
            '{"AET": .., "Host": .., "Port": ..})'
        )
    return report


def pull_get(
    peer: Peer,
    calling_ae: str,
    study_uid: str,
    into: Peer,
    expected: int | None = None,
    study_classes: Sequence[str] = (),
    progress: Progress | None = None,
) -> PullReport:
    """C-GET the study from `peer`, C-STOREing each object to `into` as it arrives (one
    object at a time on disk, none kept)."""
    report = PullReport(study_uid, "get", expected=expected)
    forwarder = Forwarder(calling_ae, into)
    tally = _Tally(progress, expected)

    def on_store(event: evt.Event) -> int:
        request = event.request
        path = Path(event.dataset_path)
        try:
            result = forwarder.forward(
                path,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
            )
        except ScuError as exc:
            result = StoreResult(path, None, str(exc))
        finally:
            handle = getattr(request, "_dataset_file", None)
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        if not result.ok:
            line = f"{request.AffectedSOPInstanceUID}: {result.describe()}"
            report.forward_failures.append(line)
            tally.note(f"FAILED to store in {into}: {line}", failure=True)
            return result.status if result.status is not None else STATUS_OUT_OF_RESOURCES
        return result.status or 0x0000

    contexts, roles = get_contexts(study_classes)
    identifier = build_identifier("STUDY", [("StudyInstanceUID", study_uid)])
    with send_files_undecoded(), receive_to_files():
        assoc = associate(
            calling_ae, peer, contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]
        )
        try:
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            _follow(
                responses, report, peer, calling_ae, "C-GET", QR_GET_SERVICE_CLASS_STATUS, tally
            )
        finally:
            release(assoc)
            forwarder.close()
    return report


def pull(
    peer: Peer,
    calling_ae: str,
    study_uid: str,
    into: Peer,
    via: str = "move",
    progress: Progress | None = None,
) -> PullReport:
    """Import a study from `peer` into `into` by C-MOVE or C-GET (+ C-STORE forwarding);
    the sub-operations done are told to `progress` as the peer reports them."""
    try:
        echo(calling_ae, into)
    except ScuError as exc:
        raise ScuError(f"the destination {into} does not answer ({exc}): is it running?") from exc
    expected, classes = study_info(peer, calling_ae, study_uid)
    if via == "move":
        return pull_move(peer, calling_ae, study_uid, into, expected, progress)
    if via == "get":
        return pull_get(peer, calling_ae, study_uid, into, expected, classes, progress)
    raise ValueError(f"via must be 'move' or 'get', not {via!r}")
