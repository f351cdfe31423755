"""C-FIND pending responses sent from bytes, in runs of PDUs written at once.

Why not yield each answer to pynetdicom: for every pending response it rebuilds and encodes
the command set twice (group length, then message), writes the identifier with pydicom,
pretty-prints it for a debug log nobody reads and moves command and identifier as two PDUs
through its network thread; measured, 1.4 ms of CPU per answer, which put a 200-study
answer at 290 ms. Here the command set of a query's pending responses (identical for all of
them) is encoded once by pynetdicom's own message classes, the identifiers come encoded
(identifier_encoding.encoded_answers), and each answer is framed as pynetdicom would frame
it (command PDU, identifier PDU) into runs of up to ``BATCH`` answers that the network
thread writes with one call (pdu_runs). The final response (success, cancel, failure) is
still pynetdicom's, queued after these on the same queue, so order holds:
:meth:`PendingResponses.flush` must run before the handler yields it.

Back-pressure: pynetdicom's network thread reads from the socket only when its send queue
is empty, so a producer that keeps the queue full would never see the peer's C-CANCEL. At
most ``QUEUE_LIMIT`` runs wait in the queue (the producer waits on the oldest one's
``done``, set by the network thread once written: no polling), nothing more is queued
while the peer has sent bytes the network thread has not read yet, and, where the kernel
tells (Linux TIOCOUTQ), while more than ``MAX_UNACKED`` bytes sent are not yet taken by the
peer: a loopback socket buffer holds megabytes, thousands of answers a C-CANCEL would arrive
too late to stop. A slow SCU thus holds the producer back instead of growing memory.
"""

from __future__ import annotations

import select
import struct
import threading
import time
from collections import deque
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode

from compacs.service.dimse import pdu_runs

STATUS_PENDING = 0xFF00
# Answers per run: 64 (about 16 KiB for a study list) rather than 16 cut the node's CPU for a
# 10,000-answer universal query from ~500 to ~300 ms (each run is one primitive through
# pynetdicom's state machine and one sendmsg), and a C-CANCEL still stops it within a few
# runs (MAX_UNACKED below).
BATCH = 64
QUEUE_LIMIT = 2  # runs waiting in pynetdicom's send queue
MAX_UNACKED = 65536  # bytes in the socket not yet taken by the peer
_WAIT = 0.0001  # seconds between looks at the socket while the peer is behind
_POLL_WRITTEN = 0.05  # longest wait for a run to be written before looking at the rest
try:  # Linux: bytes in a socket's send queue
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere: no such limit
    _TIOCOUTQ = None


class AssociationGone(Exception):
    """The association was released or aborted while answers were being sent."""


class PendingResponses:
    """Sends the pending responses of the C-FIND that `event` (EVT_C_FIND) is answering."""

    def __init__(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        self.context_id = int(event.context.context_id)
        self.dul = event.assoc.dul
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = event.request.MessageID
        rsp.AffectedSOPClassUID = event.request.AffectedSOPClassUID
        rsp.Status = STATUS_PENDING
        rsp.Identifier = BytesIO(b"\0")  # makes CommandDataSetType "present"
        message = C_FIND_RSP()
        message.primitive_to_message(rsp)
        self.command = encode(message.command_set, True, True)  # PS3.7 6.3.1: implicit VR LE
        self.max_pdu = event.assoc.dimse.maximum_pdu_size  # the peer's; 0 is unlimited
        self.sent = 0
        self._queued: deque[threading.Event] = deque()  # `done` of the runs not yet written
        self._run: list = []
        self._in_run = 0
        pdu_runs.enable(self.dul)

    def send(self, identifier: bytes) -> None:
        """Add one pending response carrying `identifier` (encoded in the context's syntax)."""
        self._run += pdu_runs.frame(self.context_id, self.command, [identifier], self.max_pdu)
        self._in_run += 1
        if self._in_run >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Queue the answers added since the last flush; `sent` counts the queued ones."""
        if not self._run:
            return
        self._wait_for_room()
        self._queued.append(pdu_runs.queue(self.dul, self.context_id, self._run).done)
        self.sent += self._in_run
        self._run, self._in_run = [], 0

    def discard(self) -> None:
        """Drop the answers not queued yet (the SCU cancelled)."""
        self._run, self._in_run = [], 0

    def _wait_for_room(self) -> None:
        """Wait until the queue, the socket and the peer allow one more run. Raises
        AssociationGone when the association ends meanwhile (the reactor, which would
        notice, is the thread waiting here), and aborts it when nothing has moved for the
        network timeout (a peer that stopped reading)."""
        queue = self.dul.to_provider_queue
        timeout = self.assoc.network_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        last = (queue.qsize(), self._unacked())
        while True:
            while self._queued and self._queued[0].is_set():
                self._queued.popleft()
            waiting = len(self._queued) >= QUEUE_LIMIT or queue.qsize() >= QUEUE_LIMIT
            if not (waiting or self._unacked() > MAX_UNACKED or self._peer_has_sent()):
                return
            if not self.dul.is_alive() or self.assoc.acse.is_aborted() or self.assoc.is_aborted:
                raise AssociationGone("the association ended while answers were being sent")
            now = (queue.qsize(), self._unacked())
            if now != last:
                last = now
                deadline = None if timeout is None else time.monotonic() + timeout
            elif deadline is not None and time.monotonic() > deadline:
                self.assoc.abort()
                raise AssociationGone(f"the peer read no answer for {timeout} s: aborted")
            if self._queued and waiting:  # woken as soon as the network thread wrote it
                self._queued[0].wait(_POLL_WRITTEN)
            else:
                time.sleep(_WAIT)

    def _unacked(self) -> int:
        sock: Any = getattr(self.dul.socket, "socket", None)
        if sock is None or _TIOCOUTQ is None:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return 0

    def _peer_has_sent(self) -> bool:
        sock: Any = getattr(self.dul.socket, "socket", None)
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):  # closed under us: the network thread will notice
            return False
        return bool(readable)
