"""The running node: opens the archive service, listens, recovers, and stops cleanly.

SIGTERM and SIGINT stop the listener first, let in-flight associations finish their
stores, let running compression jobs finish, and exit 0; objects still waiting for
compression stay pending (released for any process) and resume at the next start.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from compacs.service import rules
from compacs.service.archive_service import ArchiveService, redact
from compacs.service.config import NodeConfig
from compacs.service.dimse import scp, settings

log = logging.getLogger("compacs.node")


class NodeStartError(RuntimeError):
    """The node cannot start (its port is taken, its data folder is not writable); the
    message says what to do. Raised before any worker process starts."""


def check_port(host: str, port: int) -> None:
    """Raise NodeStartError if `host`:`port` cannot be listened on. Bound and closed again
    with the options pynetdicom's server uses (SO_REUSEADDR): on Linux that bind fails only
    when another socket listens there, which is the case to catch before the compression
    workers (seconds of start-up) and the index are opened."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NodeStartError(
            f"cannot listen on {host}:{port}: the host does not resolve ({exc.strerror}); "
            "give an address of this machine (--host or [node] host)"
        ) from exc
    family, _type, _proto, _name, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                message = (
                    f"port {port} on {host} is in use by another process (another compacs?): "
                    "stop it, or give another port (--port, [node] port or COMPACS_PORT)"
                )
            elif exc.errno == errno.EACCES:
                message = (
                    f"port {port} needs privileges (below 1024: root or CAP_NET_BIND_SERVICE): "
                    "give a port from 1024 up (--port, [node] port or COMPACS_PORT)"
                )
            elif exc.errno == errno.EADDRNOTAVAIL:
                message = (
                    f"cannot listen on {host}: not an address of this machine; give one of "
                    "its addresses, or 0.0.0.0 for all (--host or [node] host)"
                )
            else:
                message = f"cannot listen on {host}:{port}: {exc.strerror}"
            raise NodeStartError(message) from exc


def check_writable(folder: Path, what: str) -> None:
    """Raise NodeStartError unless `folder` exists or can be made, and takes a file. Tried
    for real, not with os.access: root passes that test on a read-only file system."""
    probe = folder / f".compacs-write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise NodeStartError(
            f"{what} {folder}: cannot write there ({reason}): give a folder this user "
            f"(uid {os.getuid()}) can write (--data, [node] data_dir or COMPACS_DATA)"
        ) from exc


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        # What a user can get wrong is checked before anything starts: no worker process is
        # spawned (and no index opened) for a node that cannot listen or write.
        check_port(config.host, config.port)
        check_writable(config.data_dir, "data folder")
        if (config.data_dir / "archive").is_dir():
            check_writable(config.data_dir / "archive", "archive folder")
        owners = [(f"rule {r.name!r}", r.codecs) for r in config.rules]
        owners += [(f"tier {t.name!r}", t.codecs) for t in config.tiers]
        unavailable = rules.unavailable_choices(owners)
        # The index opens (or says in one line why not) before the worker processes start.
        self.service = ArchiveService.open(config, jobs=True, create=True)
        settings.apply(config)
        for line in unavailable:
            log.warning("%s", line)
        self.ae = scp.build_ae(config)
        self.server = None
        self._stop = threading.Event()

    def start(self) -> None:
        # Listen first: owning the port is what makes this node's previous claims its own
        # to take over (archive_service.owner_name).
        self.server = self.ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=scp.handlers(self.service),
            contexts=scp.server_contexts(self.ae),
        )
        log.info(
            "compacs %s listening on %s:%d, data in %s, index %s, %d compression worker(s)",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            self.config.data_dir,
            redact(self.config.effective_index_url),
            self.config.effective_workers,
        )
        log.info("access: %s", self.config.access.describe())
        log.info(
            "rules: %s (from %s)", ", ".join(r.name for r in self.config.rules), self.config.source
        )
        self.service.recover()
        self.service.start_housekeeping()
        self.service.start_scheduler()

    def stop(self, grace: float = 60.0) -> None:
        """Stop accepting, let in-flight stores finish (up to `grace` s), then shut down."""
        if self.server is not None:
            self.server.shutdown()  # listener closed; association threads carry on
            deadline = time.monotonic() + grace
            # Only established associations can have stores in flight; a connection that
            # never sent an A-ASSOCIATE-RQ (a port probe) would hold us for the ACSE timeout.
            while time.monotonic() < deadline and any(
                a.is_established for a in self.server.active_associations
            ):
                time.sleep(0.05)
        self.service.close()
        log.info("compacs stopped")

    def run_until_signalled(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._stop.set())
        self.start()
        while not self._stop.wait(0.5):
            pass
        log.info("stop requested: finishing in-flight stores")
        self.stop()
