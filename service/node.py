"""The running node: opens the archive service, listens, recovers, and stops cleanly.

SIGTERM and SIGINT stop the listener first, let in-flight associations finish their
stores, let running compression jobs finish, and exit 0; objects still waiting for
compression stay pending (released for any process) and resume at the next start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from pynetdicom import evt

from compacs.service.archive_service import ArchiveService, redact
from compacs.service.config import NodeConfig
from compacs.service.dimse import scp, settings, tls

log = logging.getLogger("compacs.node")


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        settings.apply(config)
        self.service = ArchiveService.open(config, jobs=True, create=True)
        self.ae = scp.build_ae(config)
        self.server = None  # the plain listener ([tls] plain_port)
        self.tls_server = None  # the TLS listener ([tls] port)
        self._stop = threading.Event()

    def start(self) -> None:
        # Listen first: owning the port is what makes this node's previous claims its own
        # to take over (archive_service.owner_name).
        # One handler list for both listeners: one admission gate counts all associations.
        handlers = scp.handlers(self.service)
        contexts = scp.server_contexts(self.ae)
        tls_config = self.config.tls
        if tls_config.plain_port:
            self.server = self.ae.start_server(
                (self.config.host, self.config.port),
                block=False,
                evt_handlers=handlers,
                contexts=contexts,
            )
        if tls_config.enabled:
            context = tls.server_context(
                tls_config.certificate,
                tls_config.key,
                tls_config.ca_bundle,
                tls_config.require_client_certificate,
            )
            timeout = self.config.limits.association_request_timeout
            self.tls_server = self.ae.start_server(
                (self.config.host, tls_config.port),
                block=False,
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
        log.info(
            "rules: %s (from %s)", ", ".join(r.name for r in self.config.rules), self.config.source
        )
        self.service.recover()
        self.service.start_housekeeping()
        self.service.start_scheduler()

    def stop(self, grace: float = 60.0) -> None:
        """Stop accepting, let in-flight stores finish (up to `grace` s), then shut down."""
        servers = [s for s in (self.server, self.tls_server) if s is not None]
        if servers:
            for server in servers:
                server.shutdown()  # listener closed; association threads carry on
            deadline = time.monotonic() + grace
            # Only established associations can have stores in flight; a connection that
            # never sent an A-ASSOCIATE-RQ (a port probe) would hold us for the ACSE timeout.
            while time.monotonic() < deadline and any(
                a.is_established for s in servers for a in s.active_associations
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
