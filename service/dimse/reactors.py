"""Event-driven waits for the two threads of an accepted association, instead of polling.

pynetdicom 3.0.4 runs each association on two threads that poll: the network (DUL) thread
sleeps 1 ms whenever a pass found nothing to do, and the association thread sleeps 1 ms
before every look at its queues. That is 2,000 wake-ups a second per open association,
each taking the GIL from the thread that is receiving or answering: measured as the largest
single cost of ingest with four senders (bench/ingest_stages.py, "reactor polling": 24.5 %
of the node's CPU, 38 ms per second per open association; docs/benchmarks.md).

Here both threads wait until there is something to do, and no longer than IDLE_WAIT_SECONDS
(the timers they check, ARTIM and the network timeout, count in seconds):

- the network thread waits in `select` on its socket and on a pipe that is written when a
  primitive is queued for it to send (its `to_provider_queue`), or when it is told to stop;
- the association thread waits on an event set when a DIMSE message or an ACSE primitive is
  queued for it (`msg_queue`, `to_user_queue`), or when it is killed.

The loops are pynetdicom 3.0.4's own, with only the sleep replaced; they are installed per
association (scp's EVT_CONN_OPEN, before the threads start) and only where
internals.fast_paths() holds, so `COMPACS_FAST_PATHS=0` and any other pynetdicom version run
pynetdicom's polling loops unchanged (the tests run both).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from types import MethodType
from typing import Any

from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOCIATION_LOG
from pynetdicom.dul import LOGGER as DUL_LOG
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

IDLE_WAIT_SECONDS = 0.05


class WakingQueue(queue.Queue):
    """A queue that calls `wake()` after every put, so that its reader need not poll."""

    def __init__(self, wake: Callable[[], None], replacing: queue.Queue | None = None) -> None:
        super().__init__()
        self._wake = wake
        if replacing is not None:  # nothing is queued this early; if it were, keep it
            self.queue.extend(replacing.queue)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Pipe:
    """The network thread's wake-up: a non-blocking pipe it selects on beside its socket."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.closed = False

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self.write_fd, b"\0")

    def wait(self, sock: Any, timeout: float) -> None:
        fds: list[Any] = [self.read_fd]
        if sock is not None:
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):  # the socket closed meanwhile: the pass finds out
            return
        if self.read_fd in ready:
            with contextlib.suppress(OSError):
                os.read(self.read_fd, 4096)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.read_fd)
            os.close(self.write_fd)


def install(assoc: Any) -> None:
    """Make a new acceptor association's threads wait instead of poll (before they start)."""
    dul = assoc.dul
    pipe = _Pipe()
    dul.to_provider_queue = WakingQueue(pipe.wake, dul.to_provider_queue)
    dul.run_reactor = MethodType(_make_dul_reactor(pipe), dul)
    dul._target = make_target(dul.run_reactor)  # Thread.__init__ took the method itself
    original_kill_dul = dul.kill_dul

    def kill_dul() -> None:
        original_kill_dul()
        pipe.wake()

    dul.kill_dul = kill_dul
    dul.stop_dul = MethodType(_make_stop_dul(pipe), dul)

    activity = threading.Event()
    dul.to_user_queue = WakingQueue(activity.set, dul.to_user_queue)
    assoc.dimse.msg_queue = WakingQueue(activity.set, assoc.dimse.msg_queue)
    original_kill = assoc.kill

    def kill() -> None:
        activity.set()
        original_kill()

    assoc.kill = kill
    assoc._run_reactor = MethodType(_make_association_reactor(activity), assoc)


def _make_stop_dul(pipe: _Pipe) -> Callable[[Any], bool]:
    def stop_dul(self: Any) -> bool:
        """pynetdicom's, with a wake-up so that the thread sees the flag at once."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            pipe.wake()
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False

    return stop_dul


def _make_dul_reactor(pipe: _Pipe) -> Callable[[Any], None]:
    def run_reactor(self: Any) -> None:
        """pynetdicom 3.0.4's DULServiceProvider.run_reactor; the idle sleep is a wait."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    pipe.wait(getattr(self.socket, "socket", None), IDLE_WAIT_SECONDS)
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    # as pynetdicom: bypass the state machine, send an A-ABORT, stop both
                    DUL_LOG.error("Exception in DUL.run(), aborting association")
                    DUL_LOG.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    with contextlib.suppress(OSError):
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            pipe.close()

    return run_reactor


def _make_association_reactor(activity: threading.Event) -> Callable[[Any], None]:
    def run_reactor(self: Any) -> None:
        """pynetdicom 3.0.4's Association._run_reactor; the 1 ms sleep is a wait."""
        self._is_paused = False
        while not self._kill:
            activity.wait(IDLE_WAIT_SECONDS)
            activity.clear()  # before looking: what is queued after this wakes the next wait
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)
                activity.set()  # more may have arrived while serving: look again at once
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOCIATION_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                p_abort = " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""
                ASSOCIATION_LOG.info("Association Aborted%s", p_abort)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                ASSOCIATION_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    return run_reactor
