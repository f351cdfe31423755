"""The running node: opens the archive service, listens, recovers, and stops cleanly.

SIGTERM and SIGINT stop the listener first, give open associations `[node]
shutdown_grace_seconds` (30 s) to finish, then abort those still open (a second signal
aborts them at once), wait for their handlers, let running compression jobs finish, and
exit 0; objects still waiting for compression stay pending (released for any process) and
resume at the next start. Nothing acknowledged is lost: a C-STORE is acknowledged only
after its object is durable and indexed, and the service closes only once the handlers
have returned, so a store cut off by the abort is simply not acknowledged.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from compacs.service import rules
from compacs.service.archive_service import ArchiveService, redact
from compacs.service.config import ConfigError, NodeConfig
from compacs.service.dimse import admission, scp, settings, tls
from compacs.service.dimse.slots import SharedSlots

log = logging.getLogger("compacs.node")


class NodeStartError(RuntimeError):
    """The node cannot start (its port is taken, its data folder is not writable); the
    message says what to do. Raised before any worker process starts."""


def check_port(host: str, port: int, setting: str = "--port, [node] port or COMPACS_PORT") -> None:
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
                    f"stop it, or give another port ({setting})"
                )
            elif exc.errno == errno.EACCES:
                message = (
                    f"port {port} needs privileges (below 1024: root or CAP_NET_BIND_SERVICE): "
                    f"give a port from 1024 up ({setting})"
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


def preflight(config: NodeConfig) -> None:
    """What a user can get wrong, checked before anything starts: no worker process is
    spawned (and no index opened) for a node that cannot listen or write."""
    if config.tls.plain_port:
        check_port(config.host, config.port)
    if config.tls.enabled:
        check_port(config.host, config.tls.port, "[tls] port")
    if config.web.port:
        check_port(config.web.host, config.web.port, "[web] port or --web-port")
    check_writable(config.data_dir, "data folder")
    if (config.data_dir / "archive").is_dir():
        check_writable(config.data_dir / "archive", "archive folder")


class Node:
    """One node process. `shared`: the association slots it counts with its siblings when
    `serve --processes N` runs several (processes.py), which have been checked by their
    parent (preflight) and listen on the same port with SO_REUSEPORT; only the first of
    them (config.process 0) serves [metrics] and [web] and runs the tier scheduler."""

    def __init__(self, config: NodeConfig, shared: SharedSlots | None = None) -> None:
        self.config = config
        self.shared = shared
        if shared is None:  # a sibling's port check would find the others listening
            preflight(config)
        owners = [(f"rule {r.name!r}", r.codecs) for r in config.rules]
        owners += [(f"tier {t.name!r}", t.codecs) for t in config.tiers]
        unavailable = rules.unavailable_choices(owners)
        # The index opens (or says in one line why not) before the worker processes start.
        self.service = ArchiveService.open(config, jobs=True, create=True)
        settings.apply(config)
        for line in unavailable:
            log.warning("%s", line)
        self.ae = scp.build_ae(config)
        self.server = None  # the plain listener ([tls] plain_port)
        self.tls_server = None  # the TLS listener ([tls] port)
        self.metrics = None  # the /metrics endpoint ([metrics] port)
        self.web = None  # the DICOMweb face and status page ([web] port)
        self._stop = threading.Event()
        self._hurry = threading.Event()

    def start(self) -> None:
        first = self.config.process == 0
        if first:
            self._start_metrics()
            self._start_web()
        # Listen first: owning the port is what makes this node's previous claims its own
        # to take over (archive_service.owner_name).
        # One handler list for both listeners: one admission gate counts all associations.
        handlers = scp.handlers(self.service, self.shared)
        contexts = scp.server_contexts(self.ae)
        tls_config = self.config.tls
        if tls_config.plain_port:
            self.server = self._listen(
                (self.config.host, self.config.port), evt_handlers=handlers, contexts=contexts
            )
        if tls_config.enabled:
            context = tls.server_context(
                tls_config.certificate,
                tls_config.key,
                tls_config.ca_bundle,
                tls_config.require_client_certificate,
            )
            timeout = self.config.limits.association_request_timeout
            self.tls_server = self._listen(
                (self.config.host, tls_config.port),
                ssl_context=context,
                # after admission's EVT_CONN_OPEN handler, which may close the connection
                evt_handlers=[*handlers, (evt.EVT_CONN_OPEN, tls.handshake, [timeout])],
                contexts=contexts,
            )
        ports = [str(self.config.port)] if tls_config.plain_port else []
        if tls_config.enabled:
            ports.append(f"{tls_config.port} (TLS)")
        log.info(
            "compacs %s listening on %s port %s, data in %s, index %s, %d compression worker(s)",
            self.config.ae_title,
            self.config.host,
            " and ".join(ports),
            self.config.data_dir,
            redact(self.config.effective_index_url),
            self.config.effective_workers,
        )
        log.info("access: %s", self.config.access.describe())
        log.info("tls: %s", tls_config.describe(self.config.port))
        access = self.config.access
        if not access.rules and not _loopback_only(self.config.host):
            log.warning(
                "listening on %s, beyond this host, with no [access] table: any caller may "
                "store; C-FIND, C-GET and C-MOVE are refused (0x0124) to every caller%s. "
                "List your viewers and PACS in [access] query and retrieve "
                "(docs/security.md)",
                self.config.host,
                " not on this host" if access.local_callers else "",
            )
        log.info(
            "rules: %s (from %s)", ", ".join(r.name for r in self.config.rules), self.config.source
        )
        self.service.recover()
        self.service.start_housekeeping()
        if first:  # one scheduler per node: the tier runs of N would only race for claims
            self.service.start_scheduler()

    def _listen(self, address: tuple[str, int], **kwargs: Any) -> ThreadedAssociationServer:
        """pynetdicom's non-blocking server; with SO_REUSEPORT when sibling processes
        listen on the same port (the kernel then spreads connections over them)."""
        if self.shared is None:
            return self.ae.start_server(address, block=False, **kwargs)
        server = self.ae.make_server(address, server_class=_ReusePortServer, **kwargs)
        threading.Thread(target=server.serve_forever, name="compacs-acceptor", daemon=True).start()
        self.ae._servers.append(server)  # as start_server does: ae.shutdown() stops it too
        return server

    def _start_metrics(self) -> None:
        """The Prometheus endpoint, before the DICOM port: a metrics port in use stops the
        node before it has taken anything on."""
        metrics_config = self.config.metrics
        if not metrics_config.port:
            return
        from compacs.service.metrics import MetricsServer

        try:
            self.metrics = MetricsServer(
                metrics_config.host, metrics_config.port, self.service.index
            )
        except OSError as exc:
            self.service.close()
            raise ConfigError(
                f"[metrics] cannot listen on {metrics_config.host} port {metrics_config.port}: "
                f"{exc.strerror or exc}; choose another port ([metrics] port, --metrics-port or "
                "COMPACS_METRICS_PORT), or 0 for no metrics endpoint"
            ) from exc
        log.info(
            "metrics: http://%s:%d/metrics (Prometheus)", metrics_config.host, metrics_config.port
        )

    def _start_web(self) -> None:
        """The DICOMweb face and status page ([web] port), in a thread of this process."""
        if not self.config.web.port:
            return
        from compacs.service.web.server import WebServer

        self.web = WebServer(self.service)
        try:
            self.web.start()
        except OSError as exc:
            self.service.close()
            raise ConfigError(
                f"[web] {exc}; choose another port ([web] port or --web-port), or 0 for no web face"
            ) from exc

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, give open associations `grace` s (`[node]
        shutdown_grace_seconds`) or until a second signal, abort those left, wait for their
        handlers, then shut down."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        servers = [s for s in (self.server, self.tls_server) if s is not None]
        if servers:
            _stop_servers(servers, grace, self._hurry)
        if self.web is not None:
            self.web.close()
        if self.metrics is not None:
            self.metrics.close()
        self.service.close()
        log.info("compacs stopped")

    def run_until_signalled(self, parent: int | None = None) -> None:
        """Serve until SIGTERM or SIGINT; a node process of `serve --processes N` (`parent`:
        its parent's PID) stops on SIGTERM only, which its parent sends on either (a
        Ctrl-C reaches the whole process group: counted twice it would skip the grace),
        and stops as well when its parent is gone (killed with SIGKILL)."""

        def on_signal(signum: int, _frame: object) -> None:
            if self._stop.is_set():
                self._hurry.set()  # a second signal: no more grace
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal if parent is None else signal.SIG_IGN)
        self.start()
        while not self._stop.wait(0.5):
            if parent is not None and os.getppid() != parent:
                log.warning("the parent process %d is gone: stopping", parent)
                self._stop.set()
        log.info(
            "stop requested: open associations get %g s ([node] shutdown_grace_seconds)",
            self.config.shutdown_grace_seconds,
        )
        self.stop()


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with SO_REUSEPORT: the sockets of one user's
    processes may then listen on one port (Linux refuses another user's), each getting a
    share of the connections."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


# How long the handlers of aborted associations get to return before the service closes
# under them (a C-STORE being written then is not acknowledged: nothing is lost)
HANDLER_EXIT_SECONDS = 15.0


def _stop_servers(servers: list, grace: float, hurry: threading.Event) -> None:
    """Close the listeners, wait up to `grace` for established associations to end, abort
    the rest and wait (bounded) for their threads to finish."""
    for server in servers:
        server.shutdown()  # listener closed; association threads carry on
    deadline = time.monotonic() + grace

    def open_associations() -> list:
        return [a for server in servers for a in server.active_associations if a.is_alive()]

    # Only established associations can have stores in flight; a connection that never
    # sent an A-ASSOCIATE-RQ (a port probe) is closed by its own timeout or the abort below.
    while (
        time.monotonic() < deadline
        and not hurry.is_set()
        and any(a.is_established for a in open_associations())
    ):
        time.sleep(0.05)
    left = open_associations()
    established = [a for a in left if a.is_established]
    if established:
        log.warning(
            "aborting %d association(s) still open after the %g s grace: %s",
            len(established),
            grace,
            ", ".join(f"{a.requestor.ae_title} from {a.requestor.address}" for a in established),
        )
    for assoc in left:
        if assoc in established:
            admission.abort_soon(assoc)
        else:  # still negotiating, or never asked: nothing to abort, only a socket to close
            admission.close_unassociated(assoc)
    deadline = time.monotonic() + admission.ABORT_CLOSE_SECONDS + HANDLER_EXIT_SECONDS
    for assoc in left:
        assoc.join(max(0.0, deadline - time.monotonic()))
    stuck = [a for a in left if a.is_alive()]
    if stuck:
        log.warning(
            "%d association thread(s) still in a handler after the abort: closing the "
            "service under them (what they were storing is not acknowledged)",
            len(stuck),
        )


def _loopback_only(host: str) -> bool:
    """Whether listening on `host` reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
