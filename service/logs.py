"""The node's log lines: plain text (the default) or one JSON object per line
(`[logging] format = "json"`), for a log collector that should not parse free text.

A JSON line holds time (ISO 8601, UTC), level, logger and message, and where there is one:
peer_ae, peer_address and sop_instance_uid. Those come from `extra=` on a log call, or else
from the association being served: dimse/association_events.py sets it in the
association's thread (and scp.py the SOP Instance for the duration of a C-STORE), so that every
line logged on the way (ingest, validation, a codec) names the peer and the object without
each call passing them on.
Worker processes are set up alike (`configure_worker`, `quiet_decoder_tracebacks`), from the
same [logging] table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# `serve --processes N`: every line says which process wrote it (which one served an
# association, which one stored an object)
TEXT_FORMAT_PID = "%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"
# The attributes a JSON line carries when present, in this order
PEER_FIELDS = ("peer_ae", "peer_address", "sop_instance_uid")
_context: ContextVar[dict[str, str] | None] = ContextVar("compacs_log_context", default=None)


def association(ae: str, address: str) -> None:
    """Lines logged in this thread from now on name this peer. For an association's own
    thread (pynetdicom runs one per association, and its handlers in it), which ends with
    the association: nothing to undo."""
    _context.set({"peer_ae": str(ae).strip(), "peer_address": str(address)})


@contextlib.contextmanager
def instance(sop_instance_uid: str) -> Iterator[None]:
    """Lines logged in this thread meanwhile name this SOP Instance (and the peer)."""
    token = _context.set({**(_context.get() or {}), "sop_instance_uid": str(sop_instance_uid)})
    try:
        yield
    finally:
        _context.reset(token)


def peer_extra(ae: str, address: str, sop_instance_uid: str | None = None) -> dict[str, str]:
    """`extra=` for a log call that knows the peer (and object) itself."""
    extra = {"peer_ae": str(ae).strip(), "peer_address": str(address)}
    if sop_instance_uid:
        extra["sop_instance_uid"] = str(sop_instance_uid)
    return extra


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into "exception"); with
    `pid`, the writing process' id as "pid" (`serve --processes N`)."""

    def __init__(self, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.pid:
            entry["pid"] = record.process
        context = _context.get() or {}
        for key in PEER_FIELDS:
            value = getattr(record, key, None) or context.get(key)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(fmt: str, pid: bool = False) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(pid)
    return logging.Formatter(TEXT_FORMAT_PID if pid else TEXT_FORMAT)


def configure(fmt: str, level: str | int, pid: bool = False) -> None:
    """Set the format and level of the root logger's handlers (the CLI made them with
    basicConfig before the config, and so [logging], was read); `pid`: lines name their
    process."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr)
    for handler in root.handlers:
        handler.setFormatter(formatter(fmt, pid))
    root.setLevel(level)


def configure_worker(fmt: str, level: str | int = logging.WARNING) -> None:
    """A spawned worker process: stderr in the node's format (workers log warnings and
    errors only: what they do is logged once by the node when their result comes back)."""
    logging.basicConfig(stream=sys.stderr)
    configure(fmt, level)


def quiet_decoder_tracebacks() -> None:
    """pydicom logs a traceback for every decoder plugin that fails on a frame, before it
    raises; compacs reports that failure itself in one line (and flags the object). Here,
    beside the rest of the set-up, so that worker processes take it without the CLI."""
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
