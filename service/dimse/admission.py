"""Who gets an association: AE titles the AE VR allows, and slots that no single peer can
take all of.

Why: pynetdicom counts every connection against one `maximum_associations` from the moment
it is accepted, and a connection that never sends an A-ASSOCIATE-RQ keeps its slot until
the ACSE timeout: 64 sockets opened and closed, or 62 kept idle, refused every modality for
half a minute. Here a connection is *pending* until its A-ASSOCIATE-RQ arrives, which it
must within `[limits] association_request_timeout` (receive_limits bounds the read of a
half-sent one to the same deadline); pending connections are capped per address
(`max_pending_per_address`) and overall (`max_associations`), and a new one past a cap
closes the oldest pending one instead of being refused, so that a real sender, which asks
for its association at once, always gets to ask.

Associations are then counted overall, per calling AE title and per address
(`max_associations*`). Past the per-title or per-address cap the request gets
A-ASSOCIATE-RJ (transient, local limit exceeded). The defaults give one title a quarter
and one address half of the slots, so a peer needs several titles *and* addresses to fill
them; and when every slot is taken, a request from a caller that holds fewer associations
than the biggest holder (by title or by address) takes the slot of that holder's
longest-idle association: it is aborted, as the red team's keep-alive hog (a C-ECHO every
20 s on every slot) needs. Only an association that is not serving a request and has
received nothing for EVICTABLE_AFTER_IDLE seconds can be evicted, so a transfer in flight
is never cut. Every refusal and eviction is one log line naming the peers and the limit.

With `compacs serve --processes N` the established associations are counted in one table
that all N processes share (slots.py), so each limit holds for the node as a whole; an
eviction then takes only an association of the process that received the request (a
process cannot abort another's), and pending connections are counted per process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from compacs.service.config import Limits
from compacs.service.dimse import internals
from compacs.service.dimse.slots import SharedSlots

log = logging.getLogger("compacs.admission")

# A-ASSOCIATE-RJ (result, source, reason): PS3.8 9.3.4
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE not recognised
# ACSE timeout once associated: how long a release may take, as before these limits
ESTABLISHED_ACSE_TIMEOUT = 30.0
# An association that has received no PDU and served no request for this long is idle
EVICTABLE_AFTER_IDLE = 2.0
# How long an A-ABORT we send waits for the peer to close the connection (ARTIM)
ABORT_CLOSE_SECONDS = 2.0


def ae_title_problem(title: bytes | str) -> str | None:
    """Why `title` is not an AE title (PS3.5 6.2, VR AE): None when it is one.

    Leading and trailing spaces are not significant; trailing NUL bytes are taken as padding
    (some devices pad with them). A title of spaces only, a control character such as a tab,
    a backslash or a byte outside ASCII is refused."""
    raw = title.encode("latin-1", "replace") if isinstance(title, str) else title
    raw = raw.rstrip(b"\0 ")
    if not raw.strip(b" "):
        return "it is empty or spaces only"
    bad = sorted({b for b in raw if not 0x20 <= b <= 0x7E or b == 0x5C})
    if bad:
        return "it contains " + ", ".join(repr(bytes([b]))[1:] for b in bad)
    if len(raw.strip(b" ")) > 16:
        return "it is longer than 16 characters"
    return None


def shown(title: bytes | str) -> str:
    """An AE title for a log line: as it is when printable, else Python's escaped form, so
    that a title cannot forge or split log lines."""
    text = title.decode("latin-1") if isinstance(title, bytes) else title
    text = text.rstrip("\0 ").lstrip(" ")
    return text if text.isprintable() and text.isascii() and text else ascii(text)


@dataclass
class _Held:
    """One established association, as admission counts it."""

    ae: str
    address: str
    last_active: float  # last PDU received or request served (time.monotonic())
    serving: bool = False  # a request's handler is running
    slot: int = -1  # its place in the node's SharedSlots, if its processes share one


class Admission:
    """Connection and association accounting for one server (all its threads)."""

    def __init__(self, limits: Limits, shared: SharedSlots | None = None) -> None:
        self.limits = limits
        self.shared = shared  # the node's slots, when several processes serve its port
        self._lock = threading.Lock()
        self._pending: dict[Any, tuple[str, float]] = {}  # association -> (address, since)
        self._established: dict[Any, _Held] = {}

    # EVT_CONN_OPEN: the server thread, before the association's threads start
    def connection_opened(self, assoc: Any, address: str) -> None:
        assoc.acse_timeout = self.limits.association_request_timeout
        evict = []
        with self._lock, self._shared_lock():
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
            close_unassociated(old)

    # EVT_REQUESTED: the association's thread, A-ASSOCIATE-RQ received
    def refusal(
        self, assoc: Any, calling_ae: str, address: str
    ) -> tuple[tuple[int, ...], str] | None:
        """The A-ASSOCIATE-RJ reason and a log line if this request must be refused; when
        the node is full, may evict an idle association of the biggest holder instead."""
        ae = calling_ae.strip()
        limits = self.limits
        evicted = None
        with self._lock, self._shared_lock():
            self._pending.pop(assoc, None)
            self._forget_dead()
            if self.shared is not None:
                held = self.shared.held()
            else:
                held = [(h.ae, h.address) for h in self._established.values()]
            checks = (
                (sum(h_ae == ae for h_ae, _a in held), limits.max_associations_per_ae, "ae"),
                (
                    sum(h_address == address for _e, h_address in held),
                    limits.max_associations_per_address,
                    "address",
                ),
            )
            for count, limit, key in checks:
                if count >= limit:
                    return REJECT_LIMIT, f"[limits] max_associations_per_{key} = {limit} reached"
            if len(held) >= limits.max_associations:
                evicted = self._victim(ae, address) if internals.guards("slot eviction") else None
                if evicted is None:
                    return REJECT_LIMIT, (
                        f"[limits] max_associations = {limits.max_associations} reached, and "
                        "no bigger holder has an idle association to give up"
                    )
                self._release(self._established.pop(evicted[0]))
            slot = self.shared.take(ae, address) if self.shared is not None else -1
            self._established[assoc] = _Held(ae, address, time.monotonic(), slot=slot)
        if evicted is not None:
            victim, holder, idle = evicted
            log.warning(
                "evicted the association of %s from %s (idle %.0f s) for %s from %s: "
                "[limits] max_associations = %d reached and %s holds the most",
                shown(victim.requestor.ae_title),
                victim.requestor.address,
                idle,
                shown(ae),
                address,
                limits.max_associations,
                holder,
            )
            abort_soon(victim)
        return None

    def _victim(self, ae: str, address: str) -> tuple[Any, str, float] | None:
        """The longest-idle association of the biggest holder (by AE title or by address)
        that holds at least two more than the newcomer under the same key; with its
        holder's description and its idle time. Call with the lock held."""
        now = time.monotonic()
        by_key: dict[tuple[str, str], list[Any]] = {}
        for assoc, held in self._established.items():
            by_key.setdefault(("AE title", held.ae), []).append(assoc)
            by_key.setdefault(("address", held.address), []).append(assoc)
        mine = {
            "AE title": len(by_key.get(("AE title", ae), ())),
            "address": len(by_key.get(("address", address), ())),
        }
        for (kind, value), assocs in sorted(by_key.items(), key=lambda kv: -len(kv[1])):
            if len(assocs) < mine[kind] + 2:
                continue  # taking one of theirs would not make it fairer
            idle = [
                a
                for a in assocs
                if not self._established[a].serving
                and now - self._established[a].last_active >= EVICTABLE_AFTER_IDLE
            ]
            if idle:
                victim = min(idle, key=lambda a: self._established[a].last_active)
                shown_value = shown(value) if kind == "AE title" else value
                holder = f"{kind} {shown_value} ({len(assocs)} associations)"
                return victim, holder, now - self._established[victim].last_active
        return None

    # EVT_ACCEPTED
    def accepted(self, assoc: Any) -> None:
        assoc.acse_timeout = ESTABLISHED_ACSE_TIMEOUT
        self._track_requests(assoc)

    def touch(self, assoc: Any) -> None:
        """A PDU arrived on `assoc` (receive_limits calls this for every PDU: no lock, one
        attribute write)."""
        held = self._established.get(assoc)
        if held is not None:
            held.last_active = time.monotonic()

    def _track_requests(self, assoc: Any) -> None:
        """Mark `assoc` as serving while a request's handler runs (a C-MOVE receives nothing
        on its own association for minutes, and must not look idle). Wraps the
        association's `_serve_request` (pynetdicom 3.0.4)."""
        if not internals.guards("slot eviction"):
            return
        serve = assoc._serve_request

        def serve_request(msg: Any, context_id: int) -> None:
            held = self._established.get(assoc)
            if held is not None:
                held.serving = True
            try:
                serve(msg, context_id)
            finally:
                if held is not None:
                    held.serving = False
                    held.last_active = time.monotonic()

        assoc._serve_request = serve_request

    # EVT_RELEASED, EVT_ABORTED, EVT_REJECTED, EVT_CONN_CLOSE
    def ended(self, assoc: Any) -> None:
        with self._lock, self._shared_lock():
            self._pending.pop(assoc, None)
            held = self._established.pop(assoc, None)
            if held is not None:
                self._release(held)

    def _shared_lock(self) -> Any:
        """The shared table's lock, or none for a node of one process. Always taken after
        `_lock`, never before: no two threads can wait on each other."""
        return self.shared.lock if self.shared is not None else contextlib.nullcontext()

    def _release(self, held: _Held) -> None:
        """Give a shared slot back. Call with both locks held."""
        if self.shared is not None:
            self.shared.free(held.slot)

    def _forget_dead(self) -> None:
        """Drop associations whose threads have ended without an event we saw. Call with
        both locks held."""
        for assoc in [a for a in self._pending if a.ident is not None and not a.is_alive()]:
            del self._pending[assoc]
        for assoc in [a for a in self._established if a.ident is not None and not a.is_alive()]:
            self._release(self._established.pop(assoc))


def abort_soon(assoc: Any) -> threading.Thread:
    """A-ABORT `assoc` from outside its own thread, without waiting on its peer: pynetdicom's
    abort() blocks until the peer closes the connection or the ARTIM timer (the ACSE
    timeout, 30 s once associated) runs out, so the timer is cut to ABORT_CLOSE_SECONDS and
    the abort runs in a thread of its own. Returns that thread."""

    def run() -> None:
        with contextlib.suppress(Exception):  # it may have ended on its own meanwhile
            assoc.acse_timeout = ABORT_CLOSE_SECONDS
            assoc.abort()

    thread = threading.Thread(target=run, name="compacs-abort", daemon=True)
    thread.start()
    return thread


def close_unassociated(assoc: Any) -> None:
    """End a connection still waiting for its A-ASSOCIATE-RQ now, not at its timeout: close
    the socket and wake the association thread, which then cleans up as on a timeout."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    if internals.guards("closing idle connections at once"):
        assoc.dul.to_user_queue.put(None)  # receive_pdu() returns None: "timed out"
