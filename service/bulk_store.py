"""C-STORE sub-operations of prepared instances (wire.WireInstance) sent as one write.

Why: a C-GET requestor such as DCMTK getscu takes PDUs of at most 16 KiB, so a 512² CT slice
is 33 P-DATA-TF PDUs, and pynetdicom moves each through its network thread on its own
(queue, state machine, PDU object, encode, send, events) after encoding the whole data set
with pydicom. For a WireInstance, the command set is still encoded by pynetdicom's message
classes, but the PDUs are framed here around views of the instance's parts, without copying
them, and queued as one P-DATA whose send, on pynetdicom's network thread (so its order with
every other message holds), is one scatter-gather ``sendmsg``. Anything else (a Dataset)
goes through pynetdicom's own ``send_c_store``.

This replaces two instance attributes of pynetdicom 3.0.4 objects (``send_c_store`` of the
association and ``_send`` of its DUL) and follows pynetdicom's own send_c_store (reactor
pause, response, status) step by step; pyproject pins that version. tests/test_wire.py
checks the framing; the C-GET/C-MOVE tests against getscu, movescu and Orthanc the rest.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from compacs.service.wire import WireInstance

_PDV_OVERHEAD = 6  # item length (4), presentation context ID (1), message control header (1)
_MAX_BUFFERS = 512  # per sendmsg call (Linux allows 1024)


class PduRun(bytes):
    """Stands, as the one PDV of a carrier P-DATA, for a run of framed PDUs in `buffers`."""

    buffers: list


def frame(context_id: int, command: bytes, parts: list, max_pdu: int) -> list:
    """The buffers of the P-DATA-TF PDUs carrying `command` and the data set `parts`,
    each PDU within the peer's maximum length (0: unlimited). Parts are sliced, not copied."""
    room = (max_pdu - _PDV_OVERHEAD) if max_pdu else max(len(command), 1 << 30)
    buffers: list = []

    def pdu(control: int, chunk: list, length: int) -> None:
        buffers.append(struct.pack(">BxIIBB", 0x04, length + 6, length + 2, context_id, control))
        buffers.extend(chunk)

    for start in range(0, len(command), room):  # command fragments: 0x01, the last 0x03
        piece = command[start : start + room]
        pdu(0x03 if start + room >= len(command) else 0x01, [piece], len(piece))
    total = sum(len(p) for p in parts)
    sent, chunk, chunk_len = 0, [], 0
    for part in parts:
        view = memoryview(part).cast("B")
        at = 0
        while at < len(view):
            take = min(room - chunk_len, len(view) - at)
            chunk.append(view[at : at + take])
            chunk_len += take
            at += take
            if chunk_len == room:
                sent += chunk_len
                pdu(0x02 if sent == total else 0x00, chunk, chunk_len)
                chunk, chunk_len = [], 0
    if chunk_len or total == 0:  # data fragments: 0x00, the last 0x02
        pdu(0x02, chunk, chunk_len)
    return buffers


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """Write all of `buffers` with as few system calls as the kernel allows."""
    pending = [memoryview(b).cast("B") for b in buffers]
    while pending:
        sent = sock.sendmsg(pending[:_MAX_BUFFERS])
        while sent and pending:
            if sent >= len(pending[0]):
                sent -= len(pending.pop(0))
            else:
                pending[0] = pending[0][sent:]
                sent = 0


def enable(assoc: Any) -> Any:
    """Send this association's WireInstance C-STOREs in bulk; returns a function undoing it."""
    dimse, dul = assoc.dimse, assoc.dul
    original_send_c_store, original_send = assoc.send_c_store, dul._send

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, WireInstance):
            return original_send_c_store(dataset, msg_id, priority, originator_aet, originator_id)
        context = assoc._get_valid_context(
            dataset.SOPClassUID, dataset.transfer_syntax, "scu", allow_conversion=False
        )
        req = C_STORE()
        req.MessageID = msg_id
        req.Priority = priority
        req.MoveOriginatorApplicationEntityTitle = originator_aet
        req.MoveOriginatorMessageID = originator_id
        req.AffectedSOPClassUID = dataset.SOPClassUID
        req.AffectedSOPInstanceUID = dataset.SOPInstanceUID
        req.DataSet = BytesIO(b"\0")  # a data set follows: its bytes are `dataset.parts`
        message = C_STORE_RQ()
        message.primitive_to_message(req)
        command = encode(message.command_set, True, True)  # PS3.7 6.3.1: implicit VR LE
        run = PduRun()
        run.buffers = frame(context.context_id, command, dataset.parts, dimse.maximum_pdu_size)
        carrier = P_DATA()
        carrier.presentation_data_value_list = [[context.context_id, run]]

        assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_store: pause the reactor
        while not assoc._is_paused:
            time.sleep(0.0001)
        dul.send_pdu(carrier)
        _cx, rsp = dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        if rsp is None:  # DIMSE timeout
            assoc._handle_no_response()
            return Dataset()
        return assoc._check_received_status(rsp)

    def send(pdu: Any) -> None:
        items = getattr(pdu, "presentation_data_value_items", None)
        if not (items and len(items) == 1 and isinstance(items[0].presentation_data_value, PduRun)):
            original_send(pdu)
            return
        sock = getattr(dul.socket, "socket", None)
        if sock is None:
            return
        try:
            if hasattr(sock, "sendmsg") and not hasattr(sock, "cipher"):
                send_buffers(sock, items[0].presentation_data_value.buffers)
            else:  # TLS sockets have no sendmsg
                sock.sendall(b"".join(items[0].presentation_data_value.buffers))
        except OSError:
            dul.event_queue.put("Evt17")  # transport closed, as AssociationSocket.send does

    assoc.send_c_store, dul._send = send_c_store, send

    def restore() -> None:  # back to the class's own methods
        vars(assoc).pop("send_c_store", None)
        vars(dul).pop("_send", None)

    return restore


@contextmanager
def bulk_stores(assoc: Any) -> Iterator[None]:
    """Bulk C-STOREs on `assoc` for the duration of one C-GET."""
    restore = enable(assoc)
    try:
        yield
    finally:
        restore()
