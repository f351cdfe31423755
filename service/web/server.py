"""The web face's server: uvicorn in a thread of the node process, started after the DICOM
listeners and stopped before the archive service closes, so that no request reads a closed
index. uvicorn installs no signal handlers off the main thread: the node's own handlers
(node.py) stay in charge of SIGTERM and SIGINT."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from compacs.service.archive_service import ArchiveService
from compacs.service.web.app import build_app
from compacs.service.web.domain import Domain

log = logging.getLogger("compacs.web")


class WebServer:
    def __init__(self, service: ArchiveService) -> None:
        config = service.config
        web = config.web
        tls = {}
        if web.tls:
            tls = {"ssl_certfile": str(config.tls.certificate), "ssl_keyfile": str(config.tls.key)}
        self.scheme = "https" if web.tls else "http"
        self.url = f"{self.scheme}://{web.host}:{web.port}"
        self.domain = Domain(service)
        self.server = uvicorn.Server(
            uvicorn.Config(
                build_app(config, self.domain),
                host=web.host,
                port=web.port,
                log_config=None,  # the node's logging (logs.py) formats uvicorn's lines too
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=5,
                **tls,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="compacs-web", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; raise OSError when the port cannot be had (uvicorn logs why and
        its thread ends without serving)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the web face did not start listening on {self.url}")
            time.sleep(0.05)
        log.info("web: %s/dicomweb (DICOMweb), %s/ (status page)", self.url, self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.domain.stop()
