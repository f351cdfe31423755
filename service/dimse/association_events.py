"""The association's life: admission when it is requested (AE titles, [access], [limits]),
its start when accepted, the socket set up when the connection opens, and the slot freed
and the end logged when it ends. The DIMSE handlers are scp.py's, find_handler.py's and
retrieve_handlers.py's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable

from pynetdicom import evt

from compacs.service import logs, metrics
from compacs.service.config import NodeConfig
from compacs.service.dimse import admission, internals, reactors, receive_limits
from compacs.service.dimse.admission import REJECT_CALLED_AE, REJECT_CALLING_AE, Admission
from compacs.service.dimse.authorisation import Allows, is_local, refuse_retrieve

log = logging.getLogger("compacs.scp")


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


def handle_accepted(event: evt.Event, allows: Allows, gate: Admission) -> None:
    """EVT_ACCEPTED: log, and answer a caller that may not retrieve 0x0124 on C-GET/C-MOVE."""
    gate.accepted(event.assoc)
    requestor = event.assoc.requestor
    metrics.ASSOCIATIONS.labels("accepted").inc()
    logs.association(requestor.ae_title, requestor.address)  # this thread is the association's
    log.info(
        "association accepted: %s from %s:%s", requestor.ae_title, requestor.address, requestor.port
    )
    if not allows("retrieve", requestor.ae_title, requestor.address, is_local(event.assoc)):
        refuse_retrieve(event.assoc)


def handle_conn_open(event: evt.Event, config: NodeConfig, gate: Admission) -> None:
    """EVT_CONN_OPEN (before the association's threads start): limits, waits instead of
    polling (reactors.py), and no Nagle.

    pynetdicom leaves Nagle on, and a C-FIND-RQ/RSP exchange (command and data set in
    separate sends) then waits for delayed ACKs: a one-match C-FIND measured 88 ms with
    Nagle on both ends, 50 ms with it off on one end, 6 ms with it off on both."""
    assoc = event.assoc
    gate.connection_opened(assoc, assoc.requestor.address)
    receive_limits.install(
        assoc, config.limits, config.max_pdu, config.data_dir / "spool", on_pdu=gate.touch
    )
    if internals.fast_paths():
        reactors.install(assoc)
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def association_ended(kind: str | None, gate: Admission) -> Callable[[evt.Event], None]:
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
