"""C-GET and C-MOVE sub-operations: C-STOREs of the retrieved instances, each in a syntax
the peer accepted (retrieve.prepare makes it), on the requestor's association (C-GET) or on
a new one to the move destination (C-MOVE).

Instances are read, prepared and handed to pynetdicom one at a time, with the next one
read and decoded in a helper thread while the current one is sent, so memory does not grow
with the size of the study. With the fast paths on (dimse/internals.py) the C-STOREs go out
framed by bulk_store and the association polls its socket often; off, pynetdicom sends
plain Datasets its own way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context

from compacs.service import retrieve
from compacs.service.dimse import bulk_store, internals
from compacs.service.dimse.bulk_store import bulk_stores
from compacs.service.dimse.polling import poll_fast
from compacs.service.dimse.wire_instance import WireInstance
from compacs.service.retrieve import candidate_syntaxes
from compacs.service.storage.index import Instance
from compacs.service.syntaxes import EXPLICIT_LE
from compacs.service.wire import EncodedParts

log = logging.getLogger("compacs.retrieve")

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
# PS3.4 C.4.2.3.1: a final response of Failure or Refused means every sub-operation failed.
# For a destination that is known but cannot be reached, "Refused: Out of Resources - Unable
# to perform sub-operations" (Table C.4-2), as DCMTK's dcmqrscp answers in that case; 0xA801
# would send the caller looking for a configuration mistake that is not there.
STATUS_UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
# The C-MOVE sub-association: TCP connect, then the peer's A-ASSOCIATE-AC/RJ (the ACSE
# timeout of the node's AE). A probe that explains a failed connect waits at most this.
CONNECT_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0
ERROR_COMMENT_LENGTH = 64  # LO
# Instances read and decoded ahead of the one being sent (memory holds READ_AHEAD + 1).
READ_AHEAD = 1
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


def failed_suboperation(inst: Instance) -> Dataset:
    """A dataset pynetdicom cannot send (no context has this syntax): it counts the
    sub-operation as failed and lists the SOP Instance UID, as PS3.4 C.4.2.3.1 asks."""
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_instance_uid
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.999")  # no peer accepts it
    return ds


def accepted_for(contexts: list[PresentationContext], sop_class: str, role: str) -> list[str]:
    """Accepted syntaxes for `sop_class` in which we may send (role 'scu'), peer's order first."""
    found = []
    for cx in sorted(contexts, key=lambda c: c.context_id or 0):
        if cx.abstract_syntax == sop_class and getattr(cx, f"as_{role}"):
            found.extend(str(ts) for ts in cx.transfer_syntax)
    return found


@dataclass
class SubAssociation:
    """Filled by the sub-association's events: EVT_ACCEPTED, so the C-MOVE generator can see
    which syntaxes the move destination accepted; the others so that a destination that
    cannot be reached is reported with the reason (`failure`)."""

    assoc: Any = None
    contexts: list[PresentationContext] = field(default_factory=list)
    connected: bool = False
    rejected: bool = False

    def on_accepted(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        if internals.fast_paths():
            poll_fast(event.assoc)  # lives only for this C-MOVE
            bulk_store.enable(event.assoc)
        self.contexts = list(event.assoc.accepted_contexts)

    def on_connected(self, event: evt.Event) -> None:
        self.connected = True

    def on_rejected(self, event: evt.Event) -> None:
        self.rejected = True

    def handlers(self) -> list[tuple[Any, Callable[[evt.Event], None]]]:
        return [
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_CONN_OPEN, self.on_connected),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def failure(self, host: str, port: int, acse_timeout: float | None) -> str:
        """Why the destination gave no association (after pynetdicom's attempt failed), in
        few words: it goes into a 64-character Error Comment."""
        if self.rejected:
            return "it rejected the association"
        if self.connected:
            return f"no association answer in {acse_timeout:g} s"
        return connect_failure(host, port)


def connect_failure(host: str, port: int) -> str:
    """Why a TCP connection to host:port fails, found by trying once more (pynetdicom logs
    the first attempt's error but does not return it)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return "connection failed, now up again"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"TCP connect timed out ({CONNECT_TIMEOUT:g} s)"
    except socket.gaierror as exc:
        return f"host does not resolve ({exc.strerror})"
    except OSError as exc:
        return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def replace_final_response(
    event: evt.Event, rewrite: Callable[[Any], bool]
) -> Callable[[], None] | None:
    """Let `rewrite` amend the final C-GET/C-MOVE response to this event's request just before
    pynetdicom sends it (it returns False to leave it as it is); returns the function that
    stands this down, for when the handler goes on normally, or None where it cannot be done.

    pynetdicom's handler protocol cannot give a status with an Error Comment before the
    sub-operations start: an identifier it cannot match is 0xC413/0xC513 (handler error) or
    Success with no sub-operations, and a move destination it cannot associate with is
    0xA801 (unknown destination), whatever the reason. Wraps this association's
    `dimse.send_msg` (pynetdicom 3.0.4); on another version pynetdicom's statuses stand.
    """
    if not internals.guards("statuses with an Error Comment for C-GET/C-MOVE refusals"):
        return None
    dimse = event.assoc.dimse
    message_id = event.request.MessageID
    own = dimse.__dict__.get("send_msg")  # an earlier wrapper, or None: the class's method
    send = dimse.send_msg

    def restore() -> None:
        if dimse.__dict__.get("send_msg") is send_msg:
            if own is None:
                del dimse.send_msg
            else:
                dimse.send_msg = own

    def send_msg(primitive: Any, context_id: int) -> None:
        if (
            isinstance(primitive, C_GET | C_MOVE)
            and primitive.MessageIDBeingRespondedTo == message_id
            and primitive.Status != STATUS_PENDING
        ):
            restore()
            rewrite(primitive)
        send(primitive, context_id)

    dimse.send_msg = send_msg
    return restore


def comment(text: str) -> str:
    """An Error Comment (LO: 64 characters at most, no backslash)."""
    return text.replace("\\", "/")[:ERROR_COMMENT_LENGTH]


def refuse(event: evt.Event, status: int, reason: str) -> bool:
    """Answer this C-GET/C-MOVE `status` with `reason` as its Error Comment and no
    sub-operations; the handler then yields 0 sub-operations (and, for a C-MOVE, a
    destination), and pynetdicom's "Success, nothing to do" becomes this refusal. False
    where that cannot be done (another pynetdicom version)."""

    def rewrite(rsp: Any) -> bool:
        rsp.Status = status
        rsp.ErrorComment = comment(reason)
        return True

    return replace_final_response(event, rewrite) is not None


def fail_all(
    event: evt.Event, instances: list[Instance], why: Callable[[], str]
) -> Callable[[], None]:
    """If the move destination's association fails (pynetdicom: 0xA801), answer 0xA702 with
    every sub-operation failed, their SOP Instance UIDs listed, and `why()` as the comment.
    Returns what stands this down once the association is there."""
    transfer_syntax = UID(event.context.transfer_syntax)

    def rewrite(rsp: Any) -> bool:
        if rsp.Status != STATUS_MOVE_DESTINATION_UNKNOWN:
            return False
        reason = why()
        rsp.Status = STATUS_UNABLE_TO_PERFORM_SUBOPERATIONS
        rsp.ErrorComment = comment(reason)
        rsp.NumberOfRemainingSuboperations = None
        rsp.NumberOfCompletedSuboperations = 0
        rsp.NumberOfFailedSuboperations = len(instances)
        rsp.NumberOfWarningSuboperations = 0
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = [inst.sop_instance_uid for inst in instances]
        data = encode(
            failed,
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            transfer_syntax.is_deflated,
        )
        rsp.Identifier = BytesIO(data) if data is not None else None
        return True

    return replace_final_response(event, rewrite) or (lambda: None)


def move_contexts(instances: list[Instance]) -> list[PresentationContext]:
    """One context per (SOP class, syntax): peers such as Orthanc pick uncompressed when one
    context offers several syntaxes. Trimmed to 128 by dropping the least wanted first."""
    wanted: list[tuple[str, str]] = []
    for inst in instances:
        for ts in candidate_syntaxes(inst):
            if (inst.sop_class_uid, ts) not in wanted:
                wanted.append((inst.sop_class_uid, ts))
    if len(wanted) > MAX_CONTEXTS:  # keep as-stored and explicit VR LE for every class
        essential = [w for w in wanted if w[1] == EXPLICIT_LE] + [
            w for w in wanted if w[1] != EXPLICIT_LE
        ]
        wanted = essential[:MAX_CONTEXTS]
    return [build_context(sop, ts) for sop, ts in wanted]


def suboperations(
    read: Callable[[Instance], bytes],
    instances: list[Instance],
    event: evt.Event,
    accepted: Callable[[str], list[str]],
    accessed: Callable[[list[int]], None] = lambda ids: None,
    open_blob: retrieve.OpenBlob | None = None,
) -> Iterator[tuple[int, Dataset | None]]:
    """The (status, dataset) pairs of a C-GET/C-MOVE; `read` and `open_blob` are the archive
    service's, and `accessed` is told which instances were read (tier policies count from
    last access).

    The next instance is read and decoded in a helper thread while pynetdicom sends the
    current one (CharLS via imagecodecs releases the GIL), so at most two are in memory;
    a big one is only opened ahead, and read and decoded frame by frame as it is sent.
    """
    calling = event.assoc.requestor.ae_title
    fast = internals.fast_paths()

    def load(inst: Instance) -> Dataset:
        try:
            prepared = retrieve.prepare(read, inst, accepted(inst.sop_class_uid), fast, open_blob)
        except Exception as exc:  # damaged blob, no common syntax, decode failure
            log.error("retrieve of SOP %s for %s failed: %s", inst.sop_instance_uid, calling, exc)
            return failed_suboperation(inst)
        return WireInstance(prepared) if isinstance(prepared, EncodedParts) else prepared

    # no polling switch for event.assoc: with the fast paths it is an accepted association
    # whose network thread waits on its socket (reactors.py) and sees each response at once
    with (
        bulk_stores(event.assoc) if fast else contextlib.nullcontext(),
        ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="retrieve") as loader,
    ):
        upcoming = deque(loader.submit(load, inst) for inst in instances[:READ_AHEAD])
        for i in range(len(instances)):
            ds = upcoming.popleft().result()
            if i + READ_AHEAD < len(instances):
                upcoming.append(loader.submit(load, instances[i + READ_AHEAD]))
            if event.is_cancelled:
                log.info("retrieve cancelled by %s", calling)
                _close(ds, *(f.result() for f in upcoming))
                accessed([inst.id for inst in instances[:i]])
                yield STATUS_CANCEL, None
                return
            try:
                yield STATUS_PENDING, ds
            finally:
                _close(ds)
        accessed([inst.id for inst in instances])


def _close(*prepared: Dataset) -> None:
    """Let go of the blob files that streamed instances were sent from (or were not)."""
    for ds in prepared:
        if isinstance(ds, WireInstance):
            ds.close()
