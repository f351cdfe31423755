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

from compacs.service.archive_service import ArchiveService, redact
from compacs.service.config import NodeConfig
from compacs.service.dimse import scp, settings

log = logging.getLogger("compacs.node")


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        settings.apply(config)
        self.service = ArchiveService.open(config, jobs=True, create=True)
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
