"""A C-FIND SCU on a bare socket: for timing the node's answers on an open association
(bench/find.py), and for playing a peer that stops reading (tests/test_find.py).

Why not pynetdicom's SCU: it spends about 1 ms of CPU decoding each answer, on the same two
cores the node runs on, so a 200-answer query measured the client as much as the node. This
does what a C++ viewer's DICOM stack (DCMTK's findscu) does on the wire and nothing more:
associate once (Study Root FIND, explicit VR little endian, no PDU limit), send C-FIND-RQ,
read P-DATA-TF PDUs until the final response, count the pending ones, and send C-CANCEL
after ``cap`` of them if asked. Identifiers are not decoded (the tests check the node's).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.77.1"  # pydicom's root + a branch of ours
CONTEXT_ID = 1
PENDING = (0xFF00, 0xFF01)


class RawSCUError(Exception):
    pass


@dataclass
class FindResult:
    pending: int
    status: int


def _uid(uid: str) -> bytes:
    data = uid.encode()
    return data + b"\0" * (len(data) % 2)


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(body)) + body


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def _encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _command(**elements: object) -> bytes:
    """A command set (implicit VR LE) with its group length, PS3.7 6.3.1."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    rest = _encode(ds, implicit=True)
    return struct.pack("<HHII", 0, 0, 4, len(rest)) + rest


def _status(command: bytes) -> int:
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if (group, element) == (0, 0x0900):
            return struct.unpack_from("<H", command, offset + 8)[0]
        offset += 8 + length
    raise RawSCUError("response command set without a Status")


def association_request(
    called: str, calling: bytes, abstract_syntax: str = STUDY_ROOT_FIND, max_pdu: int = 0
) -> bytes:
    """An A-ASSOCIATE-RQ PDU with one presentation context (explicit VR LE). `calling` is
    the 16-byte field as sent: tests put there what pynetdicom's own SCU would refuse to."""
    context = _item(
        0x20,
        struct.pack(">B3x", CONTEXT_ID)
        + _item(0x30, abstract_syntax.encode())
        + _item(0x40, EXPLICIT_LE.encode()),
    )
    user = _item(
        0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    )
    body = (
        struct.pack(">H2x", 1)
        + called.encode().ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT.encode())
        + context
        + user
    )
    return _pdu(0x01, body)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One whole PDU: its type and body."""
    head = _read(sock, 6)
    pdu_type, length = struct.unpack(">BxI", head)
    return pdu_type, _read(sock, length)


def _read(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise RawSCUError("connection closed by the node")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class RawFindSCU:
    def __init__(
        self,
        host: str,
        port: int,
        called: str,
        calling: str = "RAWFIND",
        receive_buffer: int | None = None,
    ) -> None:
        """`receive_buffer`: a small SO_RCVBUF (set before connecting, so the TCP window
        follows it) makes the node wait for this reader as a slow viewer would."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(association_request(called, calling.encode()))
        pdu_type, reply = self._read_pdu()
        if pdu_type != 0x02:
            raise RawSCUError(f"association not accepted (PDU type 0x{pdu_type:02X})")
        offset = 68  # past the fixed fields; find the presentation context result
        while offset < len(reply):
            item_type, length = struct.unpack_from(">BxH", reply, offset)
            if item_type == 0x21 and reply[offset + 6] != 0:
                raise RawSCUError(f"Study Root FIND refused (result {reply[offset + 6]})")
            offset += 4 + length

    def request(self, identifier: Dataset, msg_id: int) -> None:
        """Send a C-FIND-RQ (and read nothing)."""
        command = _command(
            AffectedSOPClassUID=STUDY_ROOT_FIND,
            CommandField=0x0020,
            MessageID=msg_id,
            Priority=0,
            CommandDataSetType=0x0001,
        )
        self._send_pdv(0x03, command)
        self._send_pdv(0x02, _encode(identifier, implicit=False))

    def find(self, identifier: Dataset, msg_id: int, cap: int | None = None) -> FindResult:
        """Send one C-FIND and read every response; C-CANCEL after `cap` pending ones."""
        self.request(identifier, msg_id)
        pending = 0
        command_bytes = b""
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type != 0x04:
                raise RawSCUError(f"unexpected PDU type 0x{pdu_type:02X} during C-FIND")
            offset = 0
            while offset < len(body):
                (length,) = struct.unpack_from(">I", body, offset)
                header = body[offset + 5]
                if header & 1:  # command fragment
                    command_bytes += body[offset + 6 : offset + 4 + length]
                    if header & 2:
                        status = _status(command_bytes)
                        command_bytes = b""
                        if status not in PENDING:
                            return FindResult(pending, status)
                        pending += 1
                        if cap is not None and pending == cap:
                            self._cancel(msg_id)
                offset += 4 + length

    def release(self) -> None:
        try:
            self.sock.sendall(_pdu(0x05, bytes(4)))
            self._read_pdu()
        finally:
            self.sock.close()

    def reset(self) -> None:
        """Drop the connection at once (TCP RST), as a crashing viewer would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def _cancel(self, msg_id: int) -> None:
        command = _command(
            CommandField=0x0FFF, MessageIDBeingRespondedTo=msg_id, CommandDataSetType=0x0101
        )
        self._send_pdv(0x03, command)

    def _send_pdv(self, header: int, data: bytes) -> None:
        pdv = struct.pack(">IBB", len(data) + 2, CONTEXT_ID, header) + data
        self.sock.sendall(_pdu(0x04, pdv))

    def _read_pdu(self) -> tuple[int, bytes]:
        return read_pdu(self.sock)
