"""The C-GET and C-MOVE handlers: the instances an identifier names (retrieve.py, through
the archive service), a refusal with a reason when it names none that can be matched, and
the sub-operations (suboperations.py) on the requestor's association or on a new one to
the move destination.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy.exc import SQLAlchemyError

from compacs.service import metrics, query, retrieve
from compacs.service.archive_service import ArchiveService
from compacs.service.dimse import suboperations
from compacs.service.dimse.authorisation import (
    NOT_AUTHORISED_COMMENT,
    STATUS_NOT_AUTHORISED,
    failure,
    refused,
)

log = logging.getLogger("compacs.scp")

RETRIEVE_MODELS = [
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
]


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
    if refused(event, service.allows, "retrieve"):
        yield failure(STATUS_NOT_AUTHORISED, NOT_AUTHORISED_COMMENT["retrieve"]), None
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
    address = service.move_destination(destination)
    if address is None or refused(event, service.allows, "retrieve"):
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
