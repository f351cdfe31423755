"""`compacs serve --processes 2`: two node processes on one port, as one node.

- 4 storescu associations at once: every object stored once and exported bit-exact; the
  log shows associations served by two different processes (pids), neither the parent.
- [limits] max_associations = 2 holds for the node, not per process: with one association
  held by each process, a third is refused by either process, and a slot given back in
  one process is free in the other.
- SIGTERM to the parent stops every process of the node (no PID of its session is left).

The kernel picks the process for each connection by a hash of its addresses, so where the
test needs a given process it opens connections from new source ports until one lands there
(bounded: the chance of 40 misses is 2**-40).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import dicomdata
import numpy as np
import peers
import psutil
import pydicom
from nodecheck import exported_by_sop, wait_compressed
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_durability import start_storescu, successes

TWO = ("--processes", "2")
TRIES = 40
LINE = re.compile(
    r"\[pid (\d+)\]: association (accepted|rejected): (?:calling AE )?(\S+) from [\d.]+(?::(\d+))?"
)


def served(node: peers.CompacsProcess, kind: str = "accepted") -> list[tuple[int, str, int]]:
    """(pid, calling AE, source port or 0) of every association `kind` in the node's log."""
    return [
        (int(m[1]), m[3], int(m[4] or 0)) for m in LINE.finditer(node.log_text()) if m[2] == kind
    ]


def session_pids(session: int) -> list[int]:
    """The live processes of a session (the node runs as the leader of its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session and fields[0] != "Z":  # field 6 of proc(5): the session
            pids.append(int(entry.name))
    return pids


def echo_until_two_processes(node: peers.CompacsProcess) -> set[int]:
    """C-ECHO from new connections until the log shows two processes serving."""
    for _ in range(TRIES):
        pids = {pid for pid, _ae, _port in served(node)}
        if len(pids) >= 2:
            return pids
        assert node.echo().returncode == 0
    return {pid for pid, _ae, _port in served(node)}


def test_two_processes_store_four_associations_and_stop_together(make_node, tmp_path: Path) -> None:
    node = make_node(extra_args=TWO)
    groups = [dicomdata.ct_series(tmp_path / f"ct{i}", 25, prefix=f"p{i}") for i in range(4)]
    logs = [tmp_path / f"storescu{i}.log" for i in range(4)]
    senders = [start_storescu(node, files, log) for files, log in zip(groups, logs, strict=True)]
    for sender in senders:
        assert sender.wait(timeout=300) == 0
    acknowledged = [path for log in logs for path in successes(log)]
    assert len(acknowledged) == 100

    stats = wait_compressed(node, 100, timeout=300)
    assert stats["instances"] == 100
    out = tmp_path / "out"
    res = node.export(out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    exported = exported_by_sop(out)
    assert len(list(out.rglob("*.dcm"))) == len(exported) == 100  # each stored once
    pixels = dicomdata.ct_slice_pixels()
    for path in acknowledged:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert np.array_equal(pydicom.dcmread(exported[sop]).pixel_array, pixels), sop

    pids = echo_until_two_processes(node)
    assert len(pids) == 2, node.log_tail()
    assert node.pid not in pids  # the parent only supervises
    assert set(session_pids(node.pid)) >= {node.pid, *pids}
    assert "Traceback" not in node.log_text()

    os.kill(node.pid, signal.SIGTERM)  # not node.stop(): it kills the group's leftovers
    assert node.proc is not None and node.proc.wait(timeout=180) == 0
    assert session_pids(node.pid) == []  # node processes and their workers all gone


LIMITS = """
[limits]
max_associations = 2
max_associations_per_ae = 3  # above the total: the total is what is tested
max_associations_per_address = 3
"""


def associate(node: peers.CompacsProcess, aet: str):  # noqa: ANN201 (pynetdicom's Association)
    """A C-ECHO association from a new source port; with the pid that served it (0 when
    refused)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    port = peers.free_port()
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, bind_address=("", port))
    if not assoc.is_established:
        return assoc, 0
    for _ in range(200):  # the accepting process logs it from the association's thread
        pid = next((p for p, a, src in served(node) if a == aet and src == port), 0)
        if pid:
            return assoc, pid
        time.sleep(0.05)
    raise AssertionError(f"no log line for {aet} from port {port}:\n{node.log_tail()}")


def test_max_associations_holds_across_processes(make_node) -> None:
    node = make_node(LIMITS, extra_args=TWO)
    first, first_pid = associate(node, "HOLD1")
    assert first_pid, node.log_tail()
    second = None
    for _ in range(TRIES):  # the second association held by the other process
        assoc, pid = associate(node, "HOLD2")
        assert pid, node.log_tail()
        if pid != first_pid:
            second = assoc
            break
        assoc.release()
    assert second is not None, "every connection reached one process"

    # a third is refused, whichever process it reaches: the slots are the node's
    refusers: set[int] = set()
    for _ in range(TRIES):
        third, pid = associate(node, "THIRD")
        assert third.is_rejected and not pid, node.log_tail()
        refusers = {p for p, ae, _port in served(node, "rejected") if ae == "THIRD"}
        if len(refusers) == 2:
            break
    assert len(refusers) == 2, node.log_tail()
    assert "max_associations = 2 reached" in node.log_text()

    # a slot given back in the first process is free for whichever process comes next
    first.release()
    for _ in range(TRIES):
        fourth, pid = associate(node, "FOURTH")
        if pid:
            break
    assert pid, node.log_tail()
    fourth.release()
    second.release()
    assert node.stop() == 0


def test_a_node_process_that_dies_stops_the_node(make_node) -> None:
    node = make_node(extra_args=TWO)
    pids = echo_until_two_processes(node)
    assert len(pids) == 2, node.log_tail()
    victim = psutil.Process(min(pids))
    workers = victim.children()  # its compression workers and multiprocessing's tracker
    assert workers
    os.kill(victim.pid, signal.SIGKILL)
    assert node.proc is not None
    assert node.proc.wait(timeout=180) == 1
    assert "ended with signal SIGKILL: stopping the node" in node.log_text()
    assert not set(session_pids(node.pid)) & pids  # both node processes are gone
    # and so are the killed one's workers, which no pool shutdown could stop
    _, alive = psutil.wait_procs(workers, timeout=60)  # a deadline, not a measure
    assert not alive, [p.cmdline() for p in alive]
