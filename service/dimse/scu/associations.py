"""Opening and closing associations as an SCU, and turning a failed one into a message that
says what to check: refused connection, TLS, rejected or aborted request (Orthanc aborts
callers missing from its DicomModalities).

pynetdicom as a sender is slow with small PDUs, so we offer a large maximum PDU.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from compacs.service.dimse import identity
from compacs.service.dimse.scu.errors import NoContextError, ScuError, status_of
from compacs.service.dimse.scu.peers import Peer, check_ae_title
from compacs.service.dimse.scu.switches import pynetdicom_quiet

MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8: odd IDs 1..255)
MAX_PDU = 0  # what we offer to receive: unlimited (pynetdicom is slow with small PDUs)
NATIVE_PAIR = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def _no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: disable Nagle (a DIMSE message is several sends; see scp._no_delay)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _make_ae(calling_ae: str) -> AE:
    ae = AE(ae_title=check_ae_title(calling_ae, "calling AE title"))
    identity.apply(ae)
    ae.maximum_pdu_size = MAX_PDU
    ae.acse_timeout = 30
    ae.dimse_timeout = 300  # between two messages of one operation (a slow C-MOVE sub-op)
    ae.network_timeout = 300
    return ae


def associate(
    calling_ae: str,
    peer: Peer,
    contexts: Sequence[PresentationContext],
    *,
    roles: Sequence[Any] = (),
    handlers: Sequence[tuple] = (),
) -> Association:
    """An established association, or ScuError saying why not (refused, rejected...)."""
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts, at most {MAX_CONTEXTS}")
    ae = _make_ae(calling_ae)
    opened: list[bool] = []

    def on_open(event: evt.Event) -> None:
        opened.append(True)
        _no_delay(event)

    with pynetdicom_quiet() as errors:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=list(contexts),
            ae_title=peer.ae_title,
            max_pdu=MAX_PDU,
            ext_neg=list(roles) or None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers],
            tls_args=(peer.tls, peer.host) if peer.tls else None,
        )
    if assoc.is_established:
        return assoc
    if not opened:
        tcp = [line.split(": ", 1)[-1] for line in errors.lines if "TCP" in line]
        if peer.tls and tcp and "SSL" in tcp[-1]:
            raise ScuError(
                f"TLS with {peer} failed: {tcp[-1]}: check that {peer.port} is its TLS port, "
                "that its certificate chains to --tls-ca-bundle and names the host "
                f"{peer.host!r}, and that it accepts our --tls-certificate"
            )
        raise ScuError(
            f"cannot reach {peer}: no connection to {peer.host} port {peer.port} "
            f"({tcp[-1] if tcp else 'connection refused or timed out'})"
        )
    detail = "; ".join(line for line in errors.lines if line.startswith(("Result", "Reason")))
    if assoc.is_rejected:
        raise ScuError(
            f"{peer} rejected the association ({detail or 'no reason given'}): check the "
            f"called AE title {peer.ae_title!r} and that the peer accepts the calling AE "
            f"title {ae.ae_title!r}"
        )
    if assoc.is_aborted:
        if errors.lines and any("No accepted presentation contexts" in x for x in errors.lines):
            raise NoContextError(f"{peer} accepted none of the presentation contexts we proposed")
        # With TLS 1.3 a server refuses a client certificate after our side of the
        # handshake is done: the connection then ends at our association request.
        tls_hint = (
            "; or it refused our TLS certificate (give --tls-certificate and --tls-key if it "
            "requires one)"
            if peer.tls
            else ""
        )
        raise ScuError(
            f"{peer} aborted the association request: it may not accept calls from AE "
            f"title {ae.ae_title!r} (Orthanc: add it to DicomModalities){tls_hint}"
        )
    raise ScuError(f"{peer} did not answer the association request (timed out?)")


def release(assoc: Association) -> None:
    if assoc.is_established:
        with pynetdicom_quiet():
            assoc.release()


def accepted(assoc: Association) -> set[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs the peer accepted."""
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}


def echo(calling_ae: str, peer: Peer) -> None:
    """C-ECHO; ScuError unless the peer answers Success."""
    assoc = associate(calling_ae, peer, [build_context(Verification)])
    try:
        status, _ = status_of(assoc.send_c_echo())
    finally:
        release(assoc)
    if status != 0x0000:
        raise ScuError(f"{peer} did not answer C-ECHO with Success (status {status})")
