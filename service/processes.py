"""`compacs serve --processes N`: N node processes accepting on one port, stopped together.

Why processes: one node process is bound by the GIL (receive, parse, hash and index of
every C-STORE run in Python threads of one interpreter), so a second core helps only the
compression workers. Here the parent checks what a user can get wrong (node.preflight),
gives an empty index its schema once, then forks N node processes. Each listens on the
same port with SO_REUSEPORT (the kernel spreads connections over them, and refuses the
port to another user's sockets), opens the shared index and archive as two `compacs serve`
on one data folder already do, and has its own claim owner (archive_service.owner_name).
The first of them alone serves [metrics] and [web] and runs the tier scheduler: two
schedulers would only race for the same claims, and a port can be bound once. The
[limits] on associations hold for the node as a whole through a table in shared memory
(dimse/slots.py). The compression workers ([node] workers, 0: one per core) are divided
among the processes (at least one each), so that N processes do not start N times as many.

SIGTERM or SIGINT to the parent is passed on as SIGTERM to every node process, which stops
as a single node does (`[node] shutdown_grace_seconds` for open associations); a second
one is passed on too and skips the rest of the grace. A node process that dies stops the
whole node, its siblings with their grace, and the parent exits 1: a half-sized node that
carries on would hide the failure behind a working port, while the service manager that
runs compacs (systemd's Restart=, a container's restart policy) restarts it whole and
says so, and the restart's recovery takes over what the dead process left pending.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from compacs.service.config import ConfigError, NodeConfig
from compacs.service.dimse import admission
from compacs.service.dimse.slots import SharedSlots
from compacs.service.node import HANDLER_EXIT_SECONDS, Node, NodeStartError, preflight

log = logging.getLogger("compacs.processes")

# What a node process gets past its grace to finish the compression jobs running at stop
JOBS_EXIT_SECONDS = 60.0


def serve(config: NodeConfig) -> int:
    """Run the node as `config.effective_processes` processes until a signal or the death
    of one of them; the exit status (0: stopped by a signal, all cleanly)."""
    from compacs.service.storage.index import Index

    count = config.effective_processes
    preflight(config)
    # The schema once, here: N processes creating it at once would race
    url = config.effective_index_url
    Index.open(url, create=True, check=f"{config.source}: index").close()
    context = multiprocessing.get_context("fork")  # the shared slots pass by inheritance
    shared = SharedSlots(config.limits.max_associations, context)
    workers = max(1, config.effective_workers // count)
    parent = os.getpid()
    children: list[BaseProcess] = []
    for number in range(count):
        own = dataclasses.replace(config, process=number, workers=workers)
        child = context.Process(
            target=_run_node, args=(own, shared, parent), name=f"compacs-node-{number}"
        )
        child.start()
        children.append(child)
        log.info(
            "node process %d of %d: pid %d%s",
            number + 1,
            count,
            child.pid,
            " (also [metrics], [web] and the tier scheduler)" if number == 0 else "",
        )
    log.info(
        "%d node processes on port %d, %d compression worker(s) each; [limits] counted "
        "across all of them",
        count,
        config.port,
        workers,
    )
    return _supervise(config, children)


def _supervise(config: NodeConfig, children: list[BaseProcess]) -> int:
    """Pass signals on; when one child ends unasked, stop the others; wait for all."""
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        _terminate(children)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if any(not child.is_alive() for child in children):  # a signal before the handlers
        _terminate(children)
    failed = None
    while any(child.is_alive() for child in children):
        wait([child.sentinel for child in children if child.is_alive()], timeout=0.5)
        ended = [c for c in children if not c.is_alive()]  # unasked: even with status 0
        if ended and failed is None and not signals:
            failed = ended[0]
            log.error(
                "node process %s (pid %d) ended with %s: stopping the node; the other "
                "process(es) get %g s for their open associations ([node] "
                "shutdown_grace_seconds), then start compacs again",
                failed.name,
                failed.pid,
                _how(failed.exitcode),
                config.shutdown_grace_seconds,
            )
            _terminate(children)
            _wait_bounded(config, children)
        elif signals:
            _wait_bounded(config, children)
    bad = [c for c in children if c.exitcode != 0]
    for child in bad:
        if child is not failed:
            log.warning(
                "node process %s (pid %d) ended with %s",
                child.name,
                child.pid,
                _how(child.exitcode),
            )
    log.info("compacs stopped (%d node processes)", len(children))
    return 1 if failed is not None or bad else 0


def _wait_bounded(config: NodeConfig, children: list[BaseProcess]) -> None:
    """Wait for the children to stop on their own (grace, abort, jobs), then SIGKILL what
    is left: a stop must end even if a process hangs."""
    deadline = (
        time.monotonic()
        + config.shutdown_grace_seconds
        + admission.ABORT_CLOSE_SECONDS
        + HANDLER_EXIT_SECONDS
        + JOBS_EXIT_SECONDS
    )
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            log.error("node process %s (pid %d) did not stop: killed", child.name, child.pid)
            child.kill()
            child.join()


def _terminate(children: list[BaseProcess]) -> None:
    for child in children:
        if child.is_alive() and child.pid is not None:
            os.kill(child.pid, signal.SIGTERM)


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


def _run_node(config: NodeConfig, shared: SharedSlots, parent: int) -> None:
    """A node process: as `compacs serve` with one process, but checked by its parent."""
    from compacs.service.storage.index import IndexUnavailable
    from compacs.service.storage.schema import IndexOutOfDate

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent passes a Ctrl-C on as SIGTERM
    try:
        node = Node(config, shared)
        node.run_until_signalled(parent)
    except (IndexOutOfDate, IndexUnavailable, NodeStartError, ConfigError) as exc:
        log.error("%s", exc)
        sys.exit(2)
