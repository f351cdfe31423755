"""Who may use which DIMSE service ([access]), and the answer to a caller who may not.

The handlers of each service (scp.py's C-STORE, find_handler.py's C-FIND,
retrieve_handlers.py's C-GET and C-MOVE) ask `refused`; the association's events
(association_events.py) refuse C-GET/C-MOVE for the whole association up front.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from compacs.service.dimse import admission, internals

log = logging.getLogger("compacs.scp")

# Refused: Not Authorized, a general failure status (PS3.7 Annex C) that every DIMSE
# response may carry: what [access] answers a caller that may not use a service.
STATUS_NOT_AUTHORISED = 0x0124
# The DIMSE services of each [access] service, for log lines
_DIMSE_NAMES = {"store": "C-STORE", "query": "C-FIND", "retrieve": "C-GET/C-MOVE"}
_LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
# (service, calling AE title, address, local) -> allowed: ArchiveService.allows, Access.allows
Allows = Callable[[str, str, str, bool], bool]


# Error Comment (LO, at most 64 characters) of a 0x0124 answer: what to do about it
NOT_AUTHORISED_COMMENT = {
    service: f"not authorised: list this AE in the node's [access] {service}"
    for service in ("query", "retrieve")
}


def failure(status: int, reason: str) -> Dataset:
    """A status dataset: pynetdicom copies Error Comment (LO, 64 chars) into the C-FIND-RSP,
    so the SCU sees why, not only a number."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]
    return ds


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


def refused(event: evt.Event, allows: Allows, service: str) -> bool:
    """True (and a log line) if the calling AE may not use `service`."""
    assoc = event.assoc
    requestor = assoc.requestor
    if allows(service, requestor.ae_title, requestor.address, is_local(assoc)):
        return False
    log_refused(requestor, service)
    return True


def log_refused(requestor: Any, service: str) -> None:
    log.warning(
        "refused %s (%s) for %s from %s: not listed in [access] %s (status 0x%04X)",
        service,
        _DIMSE_NAMES[service],
        admission.shown(requestor.ae_title),
        requestor.address,
        service,
        STATUS_NOT_AUTHORISED,
    )


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
        log_refused(assoc.requestor, "retrieve")
        assoc.dimse.send_msg(rsp, context_id)

    assoc._serve_request = serve_request
