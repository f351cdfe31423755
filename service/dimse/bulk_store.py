"""C-STORE sub-operations of prepared instances (wire_instance.WireInstance) sent as one write.

Why: a C-GET requestor such as DCMTK getscu takes PDUs of at most 16 KiB, so a 512² CT slice
is 33 P-DATA-TF PDUs, each moved through pynetdicom's network thread on its own, after
pynetdicom encoded the whole data set with pydicom. For a WireInstance the command set is
still encoded by pynetdicom's message classes, but the PDUs are framed around views of the
instance's encoded parts (wire.EncodedParts) and written as one run (pdu_runs). Anything
else (a Dataset) goes through pynetdicom's own ``send_c_store``.

A streamed WireInstance (a big object, read and decoded from its blob as it goes) is framed
and queued in runs of RUN_BYTES, at most RUNS_IN_FLIGHT of them waiting for the network
thread at a time: what one such C-STORE holds in memory is bounded whatever the object's
size.

This replaces the association's ``send_c_store`` (a pynetdicom 3.0.4 instance attribute,
restored on exit) with one that follows pynetdicom's own (context, reactor pause, response,
status), with a stricter reactor pause (see _pause_reactor); pyproject pins that version,
and the C-GET/C-MOVE tests against getscu, movescu and Orthanc exercise it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from compacs.service.dimse import pdu_runs
from compacs.service.dimse.wire_instance import WireInstance
from compacs.service.wire import EncodedParts

RUN_BYTES = 4 << 20  # data set bytes framed and queued at once, for a streamed instance
RUNS_IN_FLIGHT = 2


def enable(assoc: Any) -> Any:
    """Send this association's WireInstance C-STOREs in bulk; returns a function undoing it."""
    original_send_c_store = assoc.send_c_store
    pdu_runs.enable(assoc.dul)

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, WireInstance):
            return original_send_c_store(dataset, msg_id, priority, originator_aet, originator_id)
        if not assoc.is_established or not assoc.dul.is_alive():
            # pynetdicom's own check, plus a dead network thread (peer abort), which would
            # otherwise cost every remaining sub-operation a full DIMSE timeout
            raise RuntimeError("the association has ended: C-STORE not sent")
        encoded = dataset.encoded
        context = assoc._get_valid_context(
            dataset.SOPClassUID, encoded.transfer_syntax, "scu", allow_conversion=False
        )
        req = C_STORE()
        req.MessageID = msg_id
        req.Priority = priority
        req.MoveOriginatorApplicationEntityTitle = originator_aet
        req.MoveOriginatorMessageID = originator_id
        req.AffectedSOPClassUID = dataset.SOPClassUID
        req.AffectedSOPInstanceUID = dataset.SOPInstanceUID
        req.DataSet = BytesIO(b"\0")  # a data set follows: its bytes are `encoded.parts`
        message = C_STORE_RQ()
        message.primitive_to_message(req)
        command = encode(message.command_set, True, True)  # PS3.7 6.3.1: implicit VR LE
        cx_id = int(context.context_id)
        max_pdu = assoc.dimse.maximum_pdu_size
        if encoded.streamed:
            _pause_reactor(assoc)
            _send_streamed(assoc, cx_id, command, encoded, max_pdu)
        else:
            buffers = pdu_runs.frame(cx_id, command, encoded.parts, max_pdu)
            _pause_reactor(assoc)
            pdu_runs.queue(assoc.dul, cx_id, buffers)
        _cx, rsp = assoc.dimse.get_msg(block=True)
        if rsp is None:  # DIMSE timeout
            assoc._handle_no_response()
            return Dataset()
        return assoc._check_received_status(rsp)

    assoc.send_c_store = send_c_store

    def restore() -> None:  # back to the class's own method, and the reactor let go
        vars(assoc).pop("send_c_store", None)
        assoc._reactor_checkpoint.set()

    return restore


def _send_streamed(
    assoc: Any, cx_id: int, command: bytes, dataset: EncodedParts, max_pdu: int
) -> None:
    """Queue a streamed instance's PDUs run by run, each once the network thread has
    written all but RUNS_IN_FLIGHT - 1 of the earlier ones."""
    in_flight: deque = deque()
    sent = 0

    def flush(parts: list, length: int) -> None:
        nonlocal command, sent
        buffers = pdu_runs.frame(
            cx_id, command, parts, max_pdu, data_total=dataset.encoded_length, data_before=sent
        )
        command, sent = b"", sent + length
        while len(in_flight) >= RUNS_IN_FLIGHT:
            while not in_flight[0].done.wait(0.5):
                if not assoc.dul.is_alive():
                    raise RuntimeError("the association has ended: C-STORE not sent whole")
            in_flight.popleft()
        in_flight.append(pdu_runs.queue(assoc.dul, cx_id, buffers))

    parts: list = []
    length = 0
    try:
        for part in dataset.parts:
            parts.append(part)
            length += len(part)
            if length >= RUN_BYTES:
                flush(parts, length)
                parts, length = [], 0
        if sent + length != dataset.encoded_length:
            raise RuntimeError(
                f"SOP {dataset.sop_instance_uid}: {sent + length} bytes read, "
                f"{dataset.encoded_length} announced"
            )
        if parts or not sent:
            flush(parts, length)
    except BaseException:
        if sent:  # the peer holds part of a message that can never end: abort
            with contextlib.suppress(Exception):
                assoc.abort()
        raise


def _pause_reactor(assoc: Any) -> None:
    """Keep the association's reactor thread from taking our C-STORE responses.

    pynetdicom's send_c_store clears the reactor's checkpoint, waits for its ``_is_paused``
    and sets the checkpoint again after each response. ``_is_paused`` can still read True
    for a moment after the reactor has been let through, and back-to-back sends (as these
    are, without pydicom's encoding between them) hit that moment: the reactor then took a
    C-STORE-RSP as an "unexpected C-STORE service message" and the sub-operation waited
    out the DIMSE timeout (seen once in 6 CI runs of test_movescu_to_storescp). So this
    waits until the reactor is really blocked on the checkpoint, and leaves it there until
    the C-GET ends (restore) or pynetdicom releases or aborts the C-MOVE sub-association,
    both of which set it again.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    if threading.current_thread() is assoc:
        return  # a C-GET: the reactor is this thread, inside _serve_request
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)  # CPython's Event
    while assoc.is_alive() and not (assoc._is_paused and (waiters is None or len(waiters))):
        time.sleep(0.0001)


@contextmanager
def bulk_stores(assoc: Any) -> Iterator[None]:
    """Bulk C-STOREs on `assoc` for the duration of one C-GET."""
    restore = enable(assoc)
    try:
        yield
    finally:
        restore()
