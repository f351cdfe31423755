"""pynetdicom's process-wide switches, the one place the SCU turns them: they cannot be set
per call or per association, so each is held on only while some call needs it.

- Quiet: pynetdicom logs an association's failures (refusals, rejection reasons, TCP
  errors) as errors of its own loggers; the SCU reports them itself in one line, so while it
  negotiates or releases, the ``pynetdicom`` logger stops passing them on to the root
  handlers (unless debug logging is on). Python's loggers are global to the process.
- Streaming: pynetdicom 3.0.4 reads the module globals ``STORE_SEND_CHUNKED_DATASET`` (in
  ``send_c_store``, in the caller's thread: a file path is sent undecoded from disk) and
  ``STORE_RECV_CHUNKED_DATASET`` (in the association's reactor thread, per C-STORE-RQ: the
  data set goes to a temporary Part-10 file, ``event.dataset_path``); neither has a
  per-association equivalent.

Each switch counts its holders under a lock and restores the value it found once the last
one lets go, so calls in several threads of one process neither undo each other's switch
nor leave it on. The node's process never holds them: nothing it runs imports the SCU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pynetdicom import _config


class _Switch:
    """A process-wide setting held at `on` while any caller needs it."""

    def __init__(self, read: Callable[[], Any], write: Callable[[Any], None], on: Any) -> None:
        self._read, self._write, self._on = read, write, on
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._saved = self._read()
                self._write(self._on)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._write(self._saved)


_pynetdicom_log = logging.getLogger("pynetdicom")


def _set_log(value: tuple[int, bool]) -> None:
    _pynetdicom_log.setLevel(value[0])
    _pynetdicom_log.propagate = value[1]


_QUIET = _Switch(
    lambda: (_pynetdicom_log.level, _pynetdicom_log.propagate), _set_log, (logging.ERROR, False)
)
_SEND_FILES = _Switch(
    lambda: _config.STORE_SEND_CHUNKED_DATASET,
    lambda v: setattr(_config, "STORE_SEND_CHUNKED_DATASET", v),
    True,
)
_RECEIVE_TO_FILES = _Switch(
    lambda: _config.STORE_RECV_CHUNKED_DATASET,
    lambda v: setattr(_config, "STORE_RECV_CHUNKED_DATASET", v),
    True,
)


class ErrorLog(logging.Handler):
    """Keeps pynetdicom's error lines (rejection reasons...) for our own messages."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def pynetdicom_quiet() -> Iterator[ErrorLog]:
    """Capture pynetdicom's errors (of any thread, meanwhile) instead of printing them (we
    report them ourselves), unless debug logging is on."""
    capture = ErrorLog()
    verbose = _pynetdicom_log.isEnabledFor(logging.DEBUG) or logging.getLogger().isEnabledFor(
        logging.DEBUG
    )
    _pynetdicom_log.addHandler(capture)
    try:
        with contextlib.nullcontext() if verbose else _QUIET.held():
            yield capture
    finally:
        _pynetdicom_log.removeHandler(capture)


def send_files_undecoded() -> contextlib.AbstractContextManager[None]:
    """While held, a file path given to ``send_c_store`` is streamed from disk undecoded."""
    return _SEND_FILES.held()


def receive_to_files() -> contextlib.AbstractContextManager[None]:
    """While held, a received C-STORE data set goes to a temporary Part-10 file."""
    return _RECEIVE_TO_FILES.held()
