"""The DICOM service class provider: which contexts we accept and the DIMSE event handlers.

Handlers follow pynetdicom's event-handler API: each takes the event, hands the work to the
archive service (archive_service.py: C-STORE, the instances of a C-GET/C-MOVE, their bytes)
or to the module that owns it, and returns a status, nothing more. One exception:
handle_find hands its pending answers, as bytes, to find_responses, which sends them (for
speed, see there), and yields only the final status.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError

from compacs.service import logs, metrics, query, retrieve, syntaxes
from compacs.service.archive_service import ArchiveService
from compacs.service.config import Access, NodeConfig
from compacs.service.dimse import (
    admission,
    find_responses,
    identifier_encoding,
    identity,
    internals,
    receive_limits,
    suboperations,
)
from compacs.service.dimse.admission import REJECT_CALLED_AE, REJECT_CALLING_AE, Admission
from compacs.service.sop_classes import storage_sop_classes

log = logging.getLogger("compacs.scp")

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
# Only these two: find_responses writes answers in little endian, implicit or explicit VR.
QUERY_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", IMPLICIT_VR_LE]


def handle_store(event: evt.Event, service: ArchiveService) -> int:
    """EVT_C_STORE: the object to the archive service; counted and timed (metrics.py), and
    every line logged meanwhile names the SOP Instance (logs.py)."""
    started = time.perf_counter()
    request = event.request
    sop = str(request.AffectedSOPInstanceUID)
    with logs.instance(sop):
        if _refused(event, service.config.access, "store"):
            return STATUS_NOT_AUTHORISED
        requestor = event.assoc.requestor
        args = (requestor.ae_title, str(request.AffectedSOPClassUID), sop)
        spooled = getattr(request, "_dataset_path", None)  # receive_limits: a big data set
        if spooled is None:
            raw: bytes | Path = event.encoded_dataset()
            size = len(raw)
        else:
            raw = Path(spooled)  # parsed and archived from its file
            size = raw.stat().st_size
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(size)
        status = service.receive(raw, *args)
        metrics.CSTORE_SECONDS.observe(time.perf_counter() - started)
        if status == 0x0000:  # a refusal or failure has its own line (ingest.py)
            log.info(
                "received SOP %s from %s at %s: %d bytes",
                sop,
                requestor.ae_title,
                requestor.address,
                size,
                extra=logs.peer_extra(requestor.ae_title, requestor.address, sop),
            )
        return status


# Refused: Not Authorized, a general failure status (PS3.7 Annex C) that every DIMSE
# response may carry: what [access] answers a caller that may not use a service.
STATUS_NOT_AUTHORISED = 0x0124
PYNETDICOM_THREAD_CEILING = 4096
# The DIMSE services of each [access] service, for log lines
_DIMSE_NAMES = {"store": "C-STORE", "query": "C-FIND", "retrieve": "C-GET/C-MOVE"}
_LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def is_local(assoc: Any) -> bool:
    """Whether the caller is on the node's own host: it comes from 127.0.0.1 or ::1, or
    from the very address it connected to (a process here that reached the node by the
    host's own address). Other loopback addresses (127.0.0.2 ...) do not count: a client
    comes from one only by binding it on purpose (Linux sends from 127.0.0.1 to any
    loopback address, Debian's 127.0.1.1 hostname included), and a test plays a remote
    peer from one."""
    requestor = assoc.requestor
    cached = getattr(requestor, "_compacs_local", None)
    if cached is not None:
        return cached
    local = False
    with contextlib.suppress(ValueError):
        peer = ipaddress.ip_address(requestor.address)
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        local = peer in _LOOPBACK
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if not local and sock is not None:
            with contextlib.suppress(OSError):
                own = ipaddress.ip_address(sock.getsockname()[0])
                if isinstance(own, ipaddress.IPv6Address) and own.ipv4_mapped is not None:
                    own = own.ipv4_mapped
                local = own == peer and not own.is_unspecified
    requestor._compacs_local = local
    return local


def _refused(event: evt.Event, access: Access, service: str) -> bool:
    """True (and a log line) if the calling AE may not use `service`."""
    assoc = event.assoc
    requestor = assoc.requestor
    if access.allows(service, requestor.ae_title, requestor.address, is_local(assoc)):
        return False
    _log_refused(requestor, service)
    return True


def _log_refused(requestor: Any, service: str) -> None:
    log.warning(
        "refused %s (%s) for %s from %s: not listed in [access] %s (status 0x%04X)",
        service,
        _DIMSE_NAMES[service],
        admission.shown(requestor.ae_title),
        requestor.address,
        service,
        STATUS_NOT_AUTHORISED,
    )


def handle_requested(event: evt.Event, config: NodeConfig, gate: Admission) -> None:
    """EVT_REQUESTED: reject AE titles the AE VR forbids, a called AE title that is not ours
    (`[node] check_called_ae`), callers that the [access] table allows nothing at all, and
    requests past the [limits] on associations."""
    assoc = event.assoc
    requestor = assoc.requestor
    address = requestor.address
    primitive = requestor.primitive  # negotiation not done yet: requestor.ae_title unset
    raw = receive_limits.raw_ae_titles(assoc) or {
        "calling": str(primitive.calling_ae_title),
        "called": str(primitive.called_ae_title),
    }
    calling, called = raw["calling"], raw["called"]
    refusal = None
    if problem := admission.ae_title_problem(calling):
        refusal = REJECT_CALLING_AE, f"the calling AE title is not valid: {problem}"
    elif problem := admission.ae_title_problem(called):
        refusal = REJECT_CALLED_AE, f"the called AE title is not valid: {problem}"
    else:
        calling = _text(calling)
        if config.check_called_ae and _text(called) != config.ae_title:
            refusal = (
                REJECT_CALLED_AE,
                (
                    f"called AE title {admission.shown(called)} is not this node's "
                    f"{config.ae_title} ([node] check_called_ae = true)"
                ),
            )
        elif not config.access.allows_any(calling, address, is_local(assoc)):
            refusal = REJECT_CALLING_AE, "allowed no service in [access]"
        else:
            refusal = gate.refusal(assoc, calling, address)
    if refusal is None:
        return
    reason, why = refusal
    metrics.ASSOCIATIONS.labels("rejected").inc()
    log.warning(
        "association rejected: calling AE %s from %s, called AE %s: %s",
        admission.shown(calling),
        address,
        admission.shown(called),
        why,
        extra=logs.peer_extra(admission.shown(calling), address),
    )
    # then kill() as pynetdicom's own rejections do, which lets the DUL send the A-ASSOCIATE-RJ
    assoc.acse.send_reject(*reason)
    assoc.kill()


def _text(title: bytes | str) -> str:
    """A valid AE title as compared with the config's: without its padding."""
    text = title.decode("ascii") if isinstance(title, bytes) else title
    return text.rstrip("\0 ").lstrip(" ")


def handle_accepted(event: evt.Event, access: Access, gate: Admission) -> None:
    """EVT_ACCEPTED: log, and answer a caller that may not retrieve 0x0124 on C-GET/C-MOVE."""
    gate.accepted(event.assoc)
    requestor = event.assoc.requestor
    metrics.ASSOCIATIONS.labels("accepted").inc()
    logs.association(requestor.ae_title, requestor.address)  # this thread is the association's
    log.info(
        "association accepted: %s from %s:%s", requestor.ae_title, requestor.address, requestor.port
    )
    if not access.allows("retrieve", requestor.ae_title, requestor.address, is_local(event.assoc)):
        refuse_retrieve(event.assoc)


def refuse_retrieve(assoc: Any) -> None:
    """Answer this association's C-GET and C-MOVE requests with 0x0124 (Refused: not
    authorised) before pynetdicom's service classes see them: their handler protocol has no
    way to refuse a C-MOVE but 0xA801 (unknown destination). Replaces the association's
    `_serve_request` (pynetdicom 3.0.4); on another version the handlers still refuse, with
    the statuses pynetdicom lets them give."""
    if not internals.guards("0x0124 for C-GET/C-MOVE of callers that may not retrieve"):
        return
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        kind = type(msg)  # the request primitive, as pynetdicom queues it
        if kind not in (C_GET, C_MOVE) or not msg.is_valid_request:
            serve(msg, context_id)
            return
        rsp = kind()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        rsp.Status = STATUS_NOT_AUTHORISED
        rsp.ErrorComment = NOT_AUTHORISED_COMMENT["retrieve"]
        _log_refused(assoc.requestor, "retrieve")
        assoc.dimse.send_msg(rsp, context_id)

    assoc._serve_request = serve_request


# Error Comment (LO, at most 64 characters) of a 0x0124 answer: what to do about it
NOT_AUTHORISED_COMMENT = {
    service: f"not authorised: list this AE in the node's [access] {service}"
    for service in ("query", "retrieve")
}


# C-FIND SOP class -> query information model of service/query.py
FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "patient",
    StudyRootQueryRetrieveInformationModelFind: "study",
}
STATUS_CANCEL = 0xFE00
STATUS_PENDING = 0xFF00
RETRIEVE_MODELS = [
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
]


def _failure(status: int, reason: str) -> Dataset:
    """A status dataset: pynetdicom copies Error Comment (LO, 64 chars) into the C-FIND-RSP,
    so the SCU sees why, not only a number."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]
    return ds


def handle_find(
    event: evt.Event, service: ArchiveService
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: one pending response per match, matched in SQL by query.

    With the fast paths on, the pending responses are encoded straight to bytes
    (query.find_encoded) and sent by find_responses (pynetdicom's per-answer encoding cost
    1.4 ms each); only the final status is yielded to pynetdicom. Off, they are yielded as
    Datasets (query.find), as pynetdicom's handler protocol has it. C-CANCEL is checked
    before every answer (pynetdicom records it from its receive thread); a bad identifier
    gets 0xA900/0xC000 with an Error Comment, an index failure 0xC000.
    """
    config = service.config
    calling = event.assoc.requestor.ae_title
    model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "study")
    if _refused(event, config.access, "query"):
        yield _failure(STATUS_NOT_AUTHORISED, NOT_AUTHORISED_COMMENT["query"]), None
        return
    try:
        identifier = event.identifier
    except Exception as exc:  # the identifier's bytes are not a data set
        log.warning("C-FIND from %s refused: identifier cannot be decoded: %s", calling, exc)
        yield _failure(query.STATUS_IDENTIFIER_MISMATCH, f"cannot decode identifier: {exc}"), None
        return
    level = query.query_level(identifier)
    fast = internals.fast_paths()
    try:
        if fast:
            implicit_vr = str(event.context.transfer_syntax) == IMPLICIT_VR_LE
            answers = identifier_encoding.find_encoded(
                service.index,
                identifier,
                model,
                implicit_vr=implicit_vr,
                retrieve_ae_title=config.ae_title,
            )
        else:
            answers = query.find(
                service.index, identifier, model, retrieve_ae_title=config.ae_title
            )
    except query.QueryError as exc:
        log.warning(
            "C-FIND from %s (%s root) refused: %s (status 0x%04X)",
            calling,
            model,
            exc.reason,
            exc.status,
        )
        yield _failure(exc.status, exc.reason), None
        return
    pending = find_responses.PendingResponses(event) if fast else None
    sent = 0
    try:
        for answer in answers:
            if event.is_cancelled:
                if pending is not None:
                    pending.discard()
                log.info(
                    "C-FIND from %s (%s root, %s level) cancelled after %d answer(s)",
                    calling,
                    model,
                    level,
                    sent,
                )
                yield STATUS_CANCEL, None
                return
            if pending is not None:
                pending.send(answer)
            else:
                yield STATUS_PENDING, answer
            sent += 1
        if pending is not None:
            pending.flush()
    except SQLAlchemyError as exc:
        log.error("C-FIND from %s failed after %d answer(s): index error: %s", calling, sent, exc)
        if pending is not None:
            with contextlib.suppress(find_responses.AssociationGone):
                pending.flush()  # the answers found before the failure
        yield _failure(query.STATUS_UNABLE_TO_PROCESS, "index error"), None
        return
    except find_responses.AssociationGone:
        log.warning("C-FIND from %s: association ended after %d answer(s)", calling, sent)
        return
    log.info("C-FIND from %s (%s root, %s level): %d match(es)", calling, model, level, sent)


class _Refusal(Exception):
    """A C-GET/C-MOVE answered with a status and a reason before any sub-operation."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _instances(event: evt.Event, service: ArchiveService, what: str) -> list:
    """The instances a C-GET/C-MOVE names; a _Refusal (0xA900 with the reason, 0xC000 for
    an index failure) when its identifier cannot be matched."""
    calling = event.assoc.requestor.ae_title
    try:
        identifier = event.identifier
    except Exception as exc:  # the identifier's bytes are not a data set
        log.warning("%s from %s refused: identifier cannot be decoded: %s", what, calling, exc)
        reason = f"cannot decode identifier: {exc}"
        raise _Refusal(retrieve.STATUS_IDENTIFIER_MISMATCH, reason) from exc
    try:
        instances = service.instances_for(identifier)
    except retrieve.RetrieveError as exc:
        log.warning("%s from %s refused: %s (status 0x%04X)", what, calling, exc.reason, exc.status)
        raise _Refusal(exc.status, exc.reason) from exc
    except SQLAlchemyError as exc:
        log.error("%s from %s failed: index error: %s", what, calling, exc)
        raise _Refusal(query.STATUS_UNABLE_TO_PROCESS, "index error") from exc
    log.info("%s from %s: %d instance(s)", what, calling, len(instances))
    return instances


def _timed(operation: str, answers: Iterator) -> Iterator:
    """`answers` passed through, its whole run (sub-operations included) observed in
    compacs_retrieve_seconds{operation}."""
    started = time.perf_counter()
    try:
        yield from answers
    finally:
        metrics.RETRIEVE_SECONDS.labels(operation).observe(time.perf_counter() - started)


def handle_get(event: evt.Event, service: ArchiveService) -> Iterator:
    """EVT_C_GET: sub-operations on the requestor's own association, in syntaxes it accepted;
    an identifier that cannot be matched is answered 0xA900 with the reason."""
    yield from _timed("get", _get(event, service))


def _get(event: evt.Event, service: ArchiveService) -> Iterator:
    if _refused(event, service.config.access, "retrieve"):
        yield _failure(STATUS_NOT_AUTHORISED, NOT_AUTHORISED_COMMENT["retrieve"]), None
        return
    try:
        instances = _instances(event, service, "C-GET")
    except _Refusal as refusal:
        if not suboperations.refuse(event, refusal.status, refusal.reason):
            raise  # another pynetdicom: its own status (0xC411/0xC413), the reason logged
        yield 0  # pynetdicom's "Success, no sub-operations", which refuse() amends
        return
    yield len(instances)
    contexts = event.assoc.accepted_contexts
    yield from suboperations.suboperations(
        service.read_instance,
        instances,
        event,
        lambda sop_class: suboperations.accepted_for(contexts, sop_class, "scu"),
        service.mark_accessed,
        service.open_instance,
    )


def handle_move(event: evt.Event, service: ArchiveService) -> Iterator:
    """EVT_C_MOVE: a new association to the destination from [move_destinations]. A caller
    that may not retrieve is answered 0x0124 before this runs (refuse_retrieve). An unknown
    destination is 0xA801; a listed one that cannot be reached fails every sub-operation
    with 0xA702 and says why; an identifier that cannot be matched is 0xA900 with the reason."""
    yield from _timed("move", _move(event, service))


def _move(event: evt.Event, service: ArchiveService) -> Iterator:
    calling = event.assoc.requestor.ae_title
    destination = str(event.move_destination).strip()
    address = service.config.move_destinations.get(destination)
    if address is None or _refused(event, service.config.access, "retrieve"):
        if address is None:
            log.warning(
                "C-MOVE from %s: unknown destination %r (add it to [move_destinations])",
                calling,
                destination,
            )
            suboperations.refuse(
                event, suboperations.STATUS_MOVE_DESTINATION_UNKNOWN,
                f"move destination {destination!r} not in [move_destinations]",
            )  # fmt: skip
        yield None, None  # 0xA801 Move Destination Unknown
        return
    try:
        instances = _instances(event, service, "C-MOVE")
    except _Refusal as refusal:
        if not suboperations.refuse(event, refusal.status, refusal.reason):
            raise  # another pynetdicom: its own status (0xC511), the reason logged
        yield address
        yield 0  # no association is opened for no sub-operations; refuse() amends "Success"
        return
    host, port = address
    sub = suboperations.SubAssociation()

    def unreachable() -> str:
        why = sub.failure(host, port, event.assoc.ae.acse_timeout)
        log.error(
            "C-MOVE from %s: destination %s at %s:%d cannot be reached: %s; %d sub-operation(s) "
            "failed (status 0xA702)",
            calling, destination, host, port, why, len(instances),
        )  # fmt: skip
        return f"move destination {destination}: {why} ({host}:{port})"

    stand_down = suboperations.fail_all(event, instances, unreachable)
    yield (
        host,
        port,
        {"contexts": suboperations.move_contexts(instances), "evt_handlers": sub.handlers()},
    )
    yield len(instances)
    stand_down()  # associated: pynetdicom's own responses from here on
    yield from suboperations.suboperations(
        service.read_instance,
        instances,
        event,
        lambda sop_class: suboperations.accepted_for(sub.contexts, sop_class, "scu"),
        service.mark_accessed,
        service.open_instance,
    )


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def handle_conn_open(event: evt.Event, config: NodeConfig, gate: Admission) -> None:
    """EVT_CONN_OPEN (before the association's threads start): limits, and no Nagle.

    pynetdicom leaves Nagle on, and a C-FIND-RQ/RSP exchange (command and data set in
    separate sends) then waits for delayed ACKs: a one-match C-FIND measured 88 ms with
    Nagle on both ends, 50 ms with it off on one end, 6 ms with it off on both."""
    assoc = event.assoc
    gate.connection_opened(assoc, assoc.requestor.address)
    receive_limits.install(
        assoc, config.limits, config.max_pdu, config.data_dir / "spool", on_pdu=gate.touch
    )
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _association_ended(kind: str | None, gate: Admission) -> Callable[[evt.Event], None]:
    """Free the association's slot; log how it ended (kind None: the connection's close,
    which follows every end and a connection that never associated: not logged)."""

    def handler(event: evt.Event) -> None:
        gate.ended(event.assoc)
        if kind is None:
            return
        if kind != "released":  # rejected here: by pynetdicom itself (ours: handle_requested)
            metrics.ASSOCIATIONS.labels(kind).inc()
        requestor = event.assoc.requestor
        log.info(
            "association %s: %s from %s:%s",
            kind,
            requestor.ae_title,
            requestor.address,
            requestor.port,
        )

    return handler


class _CheapCopyContext(PresentationContext):
    """A supported context that copies cheaply.

    pynetdicom deep-copies the server's supported contexts for every new association: 29 ms
    of CPU for our ~177 storage classes x 16 syntaxes, on every C-STORE, C-FIND and C-GET
    association (a one-answer findscu took 103 ms against 16 ms on an open association).
    Its attributes are immutable strings, flags and one list of syntaxes, so copying the
    attribute dict and that list is a faithful deep copy.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> _CheapCopyContext:
        copy = cls.__new__(cls)
        copy.__dict__.update(context.__dict__)
        copy._transfer_syntax = list(context._transfer_syntax)
        return copy

    def __deepcopy__(self, memo: dict) -> _CheapCopyContext:
        return self.of(self)


def server_contexts(ae: AE) -> list[PresentationContext]:
    """The AE's supported contexts, as cheaply copyable ones for `start_server` (with the
    fast paths on: the copy relies on PresentationContext's attributes in 3.0.4)."""
    if not internals.fast_paths():
        return ae.supported_contexts
    return [_CheapCopyContext.of(cx) for cx in ae.supported_contexts]


def build_ae(config: NodeConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    identity.apply(ae)  # on the associations it accepts, and on C-MOVE sub-associations
    ae.maximum_pdu_size = config.max_pdu
    # admission.py counts and limits associations; pynetdicom's own count would include
    # connections that never asked for one
    ae.maximum_associations = PYNETDICOM_THREAD_CEILING
    ae.network_timeout = config.limits.idle_timeout
    ae.connection_timeout = suboperations.CONNECT_TIMEOUT  # C-MOVE sub-associations
    ae.dimse_timeout = 60
    ae.acse_timeout = admission.ESTABLISHED_ACSE_TIMEOUT
    ae.add_supported_context(Verification)
    storage = [UID(ts) for ts in syntaxes.STORAGE_ACCEPTED]  # in syntaxes.py's order
    for uid in storage_sop_classes(config):
        # both roles: peers store to us, and take the SCP role for C-GET sub-operations
        ae.add_supported_context(uid, storage, scu_role=True, scp_role=True)
    for uid in [*FIND_MODELS, *RETRIEVE_MODELS]:
        ae.add_supported_context(uid, QUERY_TRANSFER_SYNTAXES)
    return ae


def handlers(service: ArchiveService) -> list:
    config = service.config
    gate = Admission(config.limits)  # one per server: it counts all of its associations
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [service]),
        (evt.EVT_C_FIND, handle_find, [service]),
        (evt.EVT_C_GET, handle_get, [service]),
        (evt.EVT_C_MOVE, handle_move, [service]),
        (evt.EVT_CONN_OPEN, handle_conn_open, [config, gate]),
        (evt.EVT_REQUESTED, handle_requested, [config, gate]),
        (evt.EVT_ACCEPTED, handle_accepted, [config.access, gate]),
        (evt.EVT_RELEASED, _association_ended("released", gate)),
        (evt.EVT_ABORTED, _association_ended("aborted", gate)),
        (evt.EVT_REJECTED, _association_ended("rejected", gate)),
        (evt.EVT_CONN_CLOSE, _association_ended(None, gate)),
    ]
