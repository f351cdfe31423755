"""Bounds on what one association may make the node read and hold: PDU length, PDU read
time, data set size, and big data sets spooled to a file instead of memory.

Why: pynetdicom 3.0.4 reads a PDU by asking the socket for the length its header claims,
4 KiB at a time into one growing buffer, with the socket's idle timeout per read: a PDU
that claims 4 GiB grows memory with every byte sent, and a sender that trickles a few bytes
a second is never timed out. A data set is gathered in memory whatever its size (RSS +100
MB per 100 MB of a 1 GiB element sent). Here, per association:

- a PDU longer than we advertised (`[node] max_pdu`, P-DATA-TF) or than 1 MiB (every other
  PDU type) is refused before its body is read;
- a PDU must arrive whole within `[limits] pdu_read_timeout` of its first byte, and the
  first one (the A-ASSOCIATE-RQ) within `[limits] association_request_timeout` of the
  connection: pynetdicom's own 5 s wait for it cannot end while its network thread sits in
  this read, so a half-sent request held the connection for the whole PDU timeout (30 s);
- the AE titles of an A-ASSOCIATE-RQ are read from its bytes before pynetdicom decodes
  them (it strips a trailing tab, and logs a traceback for a byte outside ASCII): one that
  the AE VR forbids is kept for scp's EVT_REQUESTED handler to refuse, and replaced by a
  placeholder that pynetdicom can decode;
- a data set larger than `[limits] max_dataset_bytes` is refused as its fragments arrive;
- a C-STORE data set larger than `[limits] spool_dataset_bytes` goes on in a file, as
  pynetdicom's own STORE_RECV_CHUNKED_DATASET does for all of them: the C-STORE handler then
  finds the file at the request's dataset path, and pynetdicom deletes it afterwards.

A refusal is an A-ABORT (the state machine's "invalid PDU" event) with one log line naming
the peer and the limit. These replace instance attributes of pynetdicom 3.0.4 objects (the
DUL's `_read_pdu_data`, the DIMSE provider's `receive_primitive`); internals.guards() keeps
them off on another version. PDUs are also read faster: whole PDUs into one buffer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta

from compacs.service.config import Limits
from compacs.service.dimse import internals
from compacs.service.dimse.admission import ae_title_problem

log = logging.getLogger("compacs.limits")

CONTROL_PDU_LIMIT = 1 << 20  # A-ASSOCIATE-RQ with 128 contexts is some 10 KiB
P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
_CHUNK = 1 << 20  # a PDU of unknown (unlimited) size grows by at most this much per read
A_ASSOCIATE_RQ = 0x01
# Called and Calling AE Title fields of an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)
_AE_FIELDS = {"called": slice(10, 26), "calling": slice(26, 42)}
_PLACEHOLDER_AE = b"INVALID".ljust(16)


class _Refused(Exception):
    """A limit was crossed: the association is aborted."""


class _Closed(Exception):
    """The peer closed the connection."""


def install(
    assoc: Any,
    limits: Limits,
    max_pdu: int,
    spool_dir: Path,
    on_pdu: Callable[[Any], None] = lambda assoc: None,
) -> None:
    """Put the limits on a new (acceptor) association, before its network thread starts.
    `on_pdu(assoc)` is told of every PDU that arrives whole (admission's idle time)."""
    if not internals.guards("the PDU and data set limits of [limits]"):
        return
    dul = assoc.dul
    dul._compacs_request_deadline = time.monotonic() + limits.association_request_timeout

    def read_pdu_data() -> None:
        if _read_pdu(dul, limits, max_pdu):
            on_pdu(assoc)

    dul._read_pdu_data = read_pdu_data
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        try:
            _check_dataset(assoc, dimse.message, primitive, limits, spool_dir)
        except _Refused as exc:
            _abort(dul, str(exc))
            return
        receive(primitive)

    dimse.receive_primitive = receive_primitive


def _peer(dul: Any) -> str:
    requestor = dul.assoc.requestor
    ae = str(getattr(requestor, "ae_title", "") or "").strip()
    return f"{ae or '(before association)'} from {requestor.address}"


def _abort(dul: Any, reason: str) -> None:
    """A-ABORT, and no more reading: the rest of an oversized PDU is never looked at."""
    log.warning("A-ABORT to %s: %s", _peer(dul), reason)
    dul._compacs_aborted = True  # what still arrives is not read: the connection is closing
    dul.event_queue.put("Evt19")  # invalid PDU: AA-8 sends A-ABORT and closes
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float, what: str) -> int:
    """Fill `view` before `deadline`; the number of bytes read (fewer: the peer closed)."""
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(what)
        sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            return got
        got += n
    return got


def raw_ae_titles(assoc: Any) -> dict[str, bytes] | None:
    """The called and calling AE titles as the A-ASSOCIATE-RQ carried them (16 bytes each);
    None where the limits are not installed."""
    return getattr(assoc.dul, "_compacs_ae_titles", None)


def _read_pdu(dul: Any, limits: Limits, max_pdu: int) -> bool:
    """Read one PDU as pynetdicom's DUL would (events onto its queues), within the limits;
    True when one arrived whole and was handed on."""
    if getattr(dul, "_compacs_aborted", False):
        dul.event_queue.put("Evt17")
        return False
    sock = dul.socket.socket
    previous_timeout = sock.gettimeout()
    deadline = time.monotonic() + limits.pdu_read_timeout
    first = getattr(dul, "_compacs_request_deadline", None)  # None once the first PDU is in
    if first is not None:
        deadline = min(deadline, first)
    try:
        try:
            pdu = _read_within(sock, deadline, limits, max_pdu)
        finally:
            sock.settimeout(previous_timeout)
    except _Closed:
        dul.event_queue.put("Evt17")  # transport connection closed
        return False
    except TimeoutError:
        if first is not None and deadline == first:
            why = (
                "no complete A-ASSOCIATE-RQ within "
                f"{limits.association_request_timeout:g} s of connecting "
                "([limits] association_request_timeout)"
            )
        else:
            why = (
                f"a PDU did not arrive whole within {limits.pdu_read_timeout:g} s "
                "([limits] pdu_read_timeout)"
            )
        _abort(dul, why)
        return False
    except _Refused as exc:
        _abort(dul, str(exc))
        return False
    except OSError as exc:  # a reset: one line, not pynetdicom's traceback
        log.info("connection from %s ended: %s", _peer(dul), exc)
        dul.event_queue.put("Evt17")
        return False
    dul._compacs_request_deadline = None
    if pdu[0] == A_ASSOCIATE_RQ and len(pdu) >= _AE_FIELDS["calling"].stop:
        _keep_ae_titles(dul, pdu)
    try:
        decoded, event = dul._decode_pdu(pdu)
    except Exception as exc:
        log.warning("A-ABORT to %s: undecodable PDU (%s: %s)", _peer(dul), type(exc).__name__, exc)
        dul.event_queue.put("Evt19")
        return False
    dul.event_queue.put(event)
    dul._recv_pdu.put(decoded)
    return True


def _keep_ae_titles(dul: Any, pdu: bytearray) -> None:
    """Keep the request's AE titles as sent; put a decodable placeholder where one is not an
    AE title (scp's EVT_REQUESTED handler refuses the request by what was kept)."""
    titles = {}
    for name, field in _AE_FIELDS.items():
        titles[name] = bytes(pdu[field])
        if ae_title_problem(titles[name]):
            pdu[field] = _PLACEHOLDER_AE
    dul._compacs_ae_titles = titles


def _read_within(sock: socket.socket, deadline: float, limits: Limits, max_pdu: int) -> bytearray:
    header = bytearray(6)
    if _recv_into(sock, memoryview(header), deadline, "header") < 6:
        raise _Closed
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type not in _KNOWN_PDU_TYPES:
        raise _Refused(f"unknown PDU type 0x{pdu_type:02X}")
    if pdu_type == P_DATA_TF:
        limit = max_pdu or limits.max_dataset_bytes + CONTROL_PDU_LIMIT
        key = "[node] max_pdu" if max_pdu else "[limits] max_dataset_bytes"
    else:
        limit, key = CONTROL_PDU_LIMIT, "the node's limit for control PDUs"
    if length > limit:
        raise _Refused(
            f"a PDU of type 0x{pdu_type:02X} claims {length} bytes, over {limit} ({key})"
        )
    pdu = bytearray(6 + min(length, max_pdu or _CHUNK))
    pdu[:6] = header
    at = 6
    while at < 6 + length:
        if at == len(pdu):  # unlimited PDU size: grow with what arrives, not with the claim
            pdu.extend(bytes(min(_CHUNK, 6 + length - at)))
        got = _recv_into(sock, memoryview(pdu)[at:], deadline, "body")
        if got < len(pdu) - at:
            raise _Closed
        at += got
    return pdu


def _check_dataset(
    assoc: Any, message: Any, primitive: Any, limits: Limits, spool_dir: Path
) -> None:
    """Refuse a data set over the limit; move a big C-STORE data set to a file."""
    incoming = sum(
        len(data) - 1 for _cx, data in primitive.presentation_data_value_list if not data[0] & 1
    )
    if message is None or not incoming:
        return
    spooled = getattr(message, "_data_set_file", None)
    held = spooled.tell() if spooled is not None else message.data_set.tell()
    if held + incoming > limits.max_dataset_bytes:
        raise _Refused(
            f"a data set of more than {limits.max_dataset_bytes} bytes ([limits] max_dataset_bytes)"
        )
    big = held + incoming > limits.spool_dataset_bytes
    if big and spooled is None and isinstance(message, C_STORE_RQ):
        _spool(assoc, message, spool_dir)


def _spool(assoc: Any, message: Any, spool_dir: Path) -> None:
    """Go on gathering `message`'s data set in a Part-10 file, as pynetdicom's chunked
    receive does (same attributes, so its C-STORE service deletes the file afterwards)."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    file = NamedTemporaryFile(  # noqa: SIM115 - pynetdicom closes and deletes it
        delete=False, mode="wb", suffix=".dcm", prefix="spool-", dir=spool_dir
    )
    command = message.command_set
    context = assoc._accepted_cx[message.context_id]
    file.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(
        file,
        create_file_meta(
            sop_class_uid=command.AffectedSOPClassUID,
            sop_instance_uid=command.AffectedSOPInstanceUID,
            transfer_syntax=context.transfer_syntax[0],
        ),
    )
    file.write(message.data_set.getbuffer())
    message.data_set = BytesIO()
    message._data_set_file = file
    message._data_set_path = Path(file.name)
