"""Runs of P-DATA-TF PDUs framed by us and written by pynetdicom's network thread at once.

Why: pynetdicom moves every PDU through its network thread on its own (queue, state machine,
PDU object, encode, send, events): py-spy put that thread at about 6 ms of CPU for the 33
PDUs of a 512² CT slice sent to a getscu with 16 KiB PDUs, and C-FIND answers (two PDUs
each) spent some 90 µs apiece in transport. The senders here (bulk_store for
C-STORE sub-operations, find_responses for C-FIND answers) frame complete PDUs themselves,
from views of their buffers, and queue them as one P-DATA primitive whose only PDV is a
:class:`PduRun`. Once :func:`enable` has been called on an association's DUL, its network thread
writes such a run with one scatter-gather ``sendmsg``; every other primitive goes through
pynetdicom as usual. Both share pynetdicom's one send queue, so messages keep their order,
and each PDU on the wire still holds one message's fragments, as pynetdicom's own do.

This replaces one instance attribute of a pynetdicom 3.0.4 object (the DUL's ``_send``,
see :func:`enable`); pyproject pins that version. tests/test_wire.py checks the framing, the
C-FIND, C-GET and C-MOVE tests against DCMTK and Orthanc the rest.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

from pynetdicom.pdu_primitives import P_DATA

PDV_OVERHEAD = 6  # item length (4), presentation context ID (1), message control header (1)
COMMAND, COMMAND_LAST, DATA, DATA_LAST = 0x01, 0x03, 0x00, 0x02  # message control headers
_MAX_BUFFERS = 512  # per sendmsg call (Linux allows 1024)


class PduRun(bytes):
    """Stands, as the one PDV of a carrier P-DATA, for the framed PDUs in `buffers`;
    `done` is set once the network thread has written them (or given up on them), so that
    a streamed sender keeps only a few runs of a big object in memory."""

    buffers: list
    done: threading.Event


def pdu_header(context_id: int, control: int, length: int) -> bytes:
    """The header of a P-DATA-TF PDU holding one PDV of `length` bytes after its control
    header: PDU type and length, then the PDV item length, context ID and control header."""
    return struct.pack(">BxIIBB", 0x04, length + 6, length + 2, context_id, control)


def frame(
    context_id: int,
    command: bytes,
    parts: list,
    max_pdu: int,
    *,
    data_total: int | None = None,
    data_before: int = 0,
) -> list:
    """The buffers of the P-DATA-TF PDUs carrying one message: `command` and the data set
    `parts`, each PDU within the peer's maximum length (0: unlimited). Parts are sliced,
    not copied. A data set streamed in several runs gives its `data_total` length and how
    much of it earlier runs held (`data_before`): only the PDU that ends it is the last."""
    if 0 < max_pdu <= PDV_OVERHEAD:  # as pynetdicom: no room for a single byte
        raise ValueError(f"the peer's maximum PDU length {max_pdu} is too small to send in")
    room = (max_pdu - PDV_OVERHEAD) if max_pdu else 1 << 62
    buffers: list = []
    for start in range(0, len(command), room):
        piece = command[start : start + room]
        last = start + room >= len(command)
        buffers += [pdu_header(context_id, COMMAND_LAST if last else COMMAND, len(piece)), piece]
    total = sum(len(p) for p in parts) if data_total is None else data_total
    done, chunk, chunk_len = data_before, [], 0
    for part in parts:
        view = memoryview(part).cast("B")
        at = 0
        while at < len(view):
            take = min(room - chunk_len, len(view) - at)
            chunk.append(view[at : at + take])
            chunk_len, at = chunk_len + take, at + take
            if chunk_len == room:
                done += chunk_len
                control = DATA_LAST if done == total else DATA
                buffers += [pdu_header(context_id, control, chunk_len), *chunk]
                chunk, chunk_len = [], 0
    if chunk_len or total == 0:  # an empty data set still gets its (empty) last fragment
        control = DATA_LAST if done + chunk_len == total else DATA
        buffers += [pdu_header(context_id, control, chunk_len), *chunk]
    return buffers


def queue(dul: Any, context_id: int, buffers: list) -> PduRun:
    """Hand framed PDUs to the network thread, behind whatever it has queued already."""
    run = PduRun()
    run.buffers = buffers
    run.done = threading.Event()
    carrier = P_DATA()
    carrier.presentation_data_value_list = [[context_id, run]]
    dul.send_pdu(carrier)
    return run


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """Write all of `buffers` with as few system calls as the kernel allows."""
    pending = [memoryview(b).cast("B") for b in buffers]
    first = 0  # pending[first:] is still to send
    while first < len(pending):
        sent = sock.sendmsg(pending[first : first + _MAX_BUFFERS])
        while sent:
            if sent >= len(pending[first]):
                sent -= len(pending[first])
                first += 1
            else:
                pending[first] = pending[first][sent:]
                sent = 0


def enable(dul: Any) -> None:
    """Let `dul` write PduRuns, for the rest of its association's life: a run may still wait
    in its queue after the sender is done, and other primitives are not affected."""
    if "_send" in vars(dul):
        return
    original_send = dul._send

    def send(pdu: Any) -> None:
        items = getattr(pdu, "presentation_data_value_items", None)
        if not (items and len(items) == 1 and isinstance(items[0].presentation_data_value, PduRun)):
            original_send(pdu)
            return
        run = items[0].presentation_data_value
        try:
            sock = getattr(dul.socket, "socket", None)
            if sock is None:
                return
            if hasattr(sock, "sendmsg") and not hasattr(sock, "cipher"):
                send_buffers(sock, run.buffers)
            else:  # TLS sockets have no sendmsg
                sock.sendall(b"".join(run.buffers))
        except Exception:  # as AssociationSocket.send: the transport is closed (Evt17)
            dul.event_queue.put("Evt17")
        finally:
            run.buffers = []  # the sender's views are released with the run
            run.done.set()

    dul._send = send
