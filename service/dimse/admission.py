"""Who gets an association: calling AE titles the AE VR allows, and slots that no single
peer can take all of.

Why: pynetdicom counts every connection against one `maximum_associations` from the moment
it is accepted, and a connection that never sends an A-ASSOCIATE-RQ keeps its slot until
the ACSE timeout: 64 sockets opened and closed, or 62 kept idle, refused every modality for
half a minute. Here a connection is *pending* until its A-ASSOCIATE-RQ arrives, which it
must within `[limits] association_request_timeout`; pending connections are capped per
address (`max_pending_per_address`) and overall (`max_associations`), and a new one past a
cap closes the oldest pending one instead of being refused, so that a real sender, which
asks for its association at once, always gets to ask. Associations are then counted
overall, per calling AE title and per address (`max_associations*`); past a limit the
request gets A-ASSOCIATE-RJ (transient, local limit exceeded). Every refusal is one log
line naming the peer and the limit.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

from compacs.service.config import Limits
from compacs.service.dimse import internals

log = logging.getLogger("compacs.admission")

# A-ASSOCIATE-RJ (result, source, reason): PS3.8 9.3.4
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
# ACSE timeout once associated: how long a release may take, as before these limits
ESTABLISHED_ACSE_TIMEOUT = 30.0


def ae_title_problem(title: str) -> str | None:
    """Why `title` is not an AE title (PS3.5 6.2, VR AE): None when it is one. Leading and
    trailing spaces are not significant; a title of spaces only is not allowed."""
    if not title.strip(" "):
        return "it is empty"
    bad = sorted({c for c in title if not 0x20 <= ord(c) <= 0x7E or c == "\\"})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)}"
    if len(title) > 16:
        return "it is longer than 16 characters"
    return None


class Admission:
    """Connection and association accounting for one server (all its threads)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: dict[Any, tuple[str, float]] = {}  # association -> (address, since)
        self._established: dict[Any, tuple[str, str]] = {}  # association -> (AE, address)

    # EVT_CONN_OPEN: the server thread, before the association's threads start
    def connection_opened(self, assoc: Any, address: str) -> None:
        assoc.acse_timeout = self.limits.association_request_timeout
        evict = []
        with self._lock:
            self._forget_dead()
            mine = [a for a, (addr, _t) in self._pending.items() if addr == address]
            if len(mine) >= self.limits.max_pending_per_address:
                evict.append(
                    (mine[0], "max_pending_per_address", self.limits.max_pending_per_address)
                )
            elif len(self._pending) >= self.limits.max_associations:
                oldest = min(self._pending, key=lambda a: self._pending[a][1])
                evict.append((oldest, "max_associations", self.limits.max_associations))
            for old, _key, _n in evict:
                self._pending.pop(old, None)
            self._pending[assoc] = (address, time.monotonic())
        for old, key, limit in evict:
            log.warning(
                "closed a connection from %s that had not asked for an association: "
                "[limits] %s = %d reached",
                old.requestor.address,
                key,
                limit,
            )
            _close_unassociated(old)

    # EVT_REQUESTED: the association's thread, A-ASSOCIATE-RQ received
    def refusal(
        self, assoc: Any, calling_ae: str, address: str
    ) -> tuple[tuple[int, ...], str] | None:
        """The A-ASSOCIATE-RJ reason and a log line if this request must be refused."""
        problem = ae_title_problem(calling_ae)
        if problem:
            with self._lock:
                self._pending.pop(assoc, None)
            return REJECT_CALLING_AE, f"calling AE title {calling_ae!r} is not valid: {problem}"
        ae = calling_ae.strip()
        limits = self.limits
        with self._lock:
            self._pending.pop(assoc, None)
            self._forget_dead()
            peers = list(self._established.values())
            checks = (
                (len(peers), limits.max_associations, "max_associations"),
                (
                    sum(a == ae for a, _ in peers),
                    limits.max_associations_per_ae,
                    "max_associations_per_ae",
                ),
                (
                    sum(h == address for _, h in peers),
                    limits.max_associations_per_address,
                    "max_associations_per_address",
                ),
            )
            for count, limit, key in checks:
                if count >= limit:
                    return REJECT_LIMIT, f"[limits] {key} = {limit} reached"
            self._established[assoc] = (ae, address)
        return None

    # EVT_ACCEPTED
    def accepted(self, assoc: Any) -> None:
        assoc.acse_timeout = ESTABLISHED_ACSE_TIMEOUT

    # EVT_RELEASED, EVT_ABORTED, EVT_REJECTED, EVT_CONN_CLOSE
    def ended(self, assoc: Any) -> None:
        with self._lock:
            self._pending.pop(assoc, None)
            self._established.pop(assoc, None)

    def _forget_dead(self) -> None:
        """Drop associations whose threads have ended without an event we saw."""
        for table in (self._pending, self._established):
            for assoc in [a for a in table if a.ident is not None and not a.is_alive()]:
                del table[assoc]


def _close_unassociated(assoc: Any) -> None:
    """End a connection still waiting for its A-ASSOCIATE-RQ now, not at its timeout: close
    the socket and wake the association thread, which then cleans up as on a timeout."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    if internals.guards("closing idle connections at once"):
        assoc.dul.to_user_queue.put(None)  # receive_pdu() returns None: "timed out"
