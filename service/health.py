"""`compacs health`: is this node fit to take studies? One line and an exit code.

Made for container health checks (the image's HEALTHCHECK, a compose healthcheck) and for
monitoring scripts: it asks the running node itself over DICOM, not just whether a process
exists, because a node whose index or disk is gone still holds its port. Each check is
bounded in time, so a hung database makes the check fail rather than hang the supervisor.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from compacs.service.config import NodeConfig

HEALTH_AE = "COMPACS-HEALTH"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def echo_host(config: NodeConfig) -> str:
    """Where the node can be reached from its own host: loopback when it listens on every
    interface (the usual case in a container), else the one address it listens on."""
    return "127.0.0.1" if config.host in _WILDCARD_HOSTS else config.host


def check_echo(config: NodeConfig, timeout: float) -> Check:
    """C-ECHO to the node. An association the node rejects still counts as an answer: the
    node is up and speaking DICOM, and only its [access] table keeps this caller out (a
    health check must not need an entry there)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    host = echo_host(config)
    where = f"{config.ae_title}@{host}:{config.port}"
    ae = AE(ae_title=HEALTH_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, config.port, ae_title=config.ae_title)
    try:
        if assoc.is_rejected:
            return Check("C-ECHO", True, f"{where} answers (association rejected by its [access])")
        if not assoc.is_established:
            return Check("C-ECHO", False, f"{where}: no association (is `compacs serve` running?)")
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        if code == 0x0000:
            return Check("C-ECHO", True, f"{where} ok")
        shown = "no response" if code is None else f"status 0x{code:04X}"
        return Check("C-ECHO", False, f"{where}: {shown}")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def check_index(config: NodeConfig, timeout: float) -> Check:
    """The index answers a query and carries a compacs schema at this compacs' revision.
    A SQLite index must already exist: opening a missing one would create an empty file."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    from compacs.service.archive_service import redact
    from compacs.service.storage.schema import current_revision, head_revision

    url = config.effective_index_url
    shown = redact(url)
    connect_args: dict[str, object] = {}
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1])
        if not path.is_file():
            return Check("index", False, f"{shown}: no such file (has the node ever started?)")
        connect_args["timeout"] = timeout
    elif url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(timeout))
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        revision, head = current_revision(engine), head_revision()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return Check("index", False, f"{shown}: unreachable: {reason}")
    finally:
        engine.dispose()
    if revision != head:
        return Check(
            "index", False, f"{shown}: schema revision {revision or '(none)'}, need {head}"
        )
    return Check("index", True, "ok")


def check_archive(config: NodeConfig) -> Check:
    """A file can be created, synced and removed where received objects land."""
    root = config.data_dir / "archive"
    probe = root / f".health-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"compacs health\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        return Check("archive", False, f"{root} not writable: {exc.strerror or exc}")
    return Check("archive", True, f"{root} writable")


def check_disk(config: NodeConfig, min_free_bytes: int) -> Check:
    root = config.data_dir / "archive"
    where = root if root.exists() else config.data_dir
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Check("disk", False, f"{where}: {exc.strerror or exc}")
    text = f"{free / 1e9:.1f} GB free"
    if free < min_free_bytes:
        return Check("disk", False, f"{text} in {where}, below {min_free_bytes / 1e9:.1f} GB")
    return Check("disk", True, text)


def run_checks(config: NodeConfig, min_free_bytes: int, timeout: float) -> list[Check]:
    return [
        check_echo(config, timeout),
        check_index(config, timeout),
        check_archive(config),
        check_disk(config, min_free_bytes),
    ]


def summary(checks: list[Check]) -> str:
    """`healthy: ...` listing every check, or `unhealthy: ...` naming only the failed ones
    (what a person reading a container's health log needs first)."""
    failed = [c for c in checks if not c.ok]
    if failed:
        return "unhealthy: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
    return "healthy: " + "; ".join(f"{c.name} {c.detail}" for c in checks)
