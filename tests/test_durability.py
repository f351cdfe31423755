"""Invariant 1: no acknowledged data is lost. Kill -9 the node mid-ingest, restart, check.

Also: SIGTERM finishes in-flight stores and exits 0; a blob whose bytes change on disk is
caught by its checksum (invariant 5).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
from nodecheck import exported_by_sop, wait_compressed


def start_storescu(node: peers.CompacsProcess, files: list[Path], log: Path) -> subprocess.Popen:
    args = [
        "storescu",
        "-v",
        "-nh",
        "-R",
        "-aet",
        "STORESCU",
        "-aec",
        node.ae_title,
        node.host,
        str(node.port),
        *map(str, files),
    ]
    return subprocess.Popen(
        args,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=peers.dcmtk_env(),
        stdin=subprocess.DEVNULL,
    )


def successes(log: Path) -> dict[str, str]:
    return {f: r for f, r in peers.parse_storescu_log(log.read_text()).items() if r == "Success"}


def freeze_after(
    senders: Sequence[subprocess.Popen], logs: Sequence[Path], acknowledged: int
) -> None:
    """Let the senders run only in 20 ms slices (SIGCONT, sleep, SIGSTOP) until their logs
    hold at least ``acknowledged`` successes, and leave them frozen, maybe mid-C-STORE.

    The throttle that puts a kill mid-ingest by construction: a frozen sender cannot finish
    behind the test's back, however fast the node or slow the test process.
    """
    for sender in senders:
        sender.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 300  # a deadline, not a measure
    while sum(len(successes(log)) for log in logs) < acknowledged:
        running = [s for s in senders if s.poll() is None]
        assert running, f"the senders ended before {acknowledged} were acknowledged"
        assert time.monotonic() < deadline, f"{acknowledged} not acknowledged in 300 s"
        for sender in running:
            sender.send_signal(signal.SIGCONT)
        time.sleep(0.02)
        for sender in running:
            sender.send_signal(signal.SIGSTOP)
        time.sleep(0.01)  # let storescu's log writes of the slice land


def thaw(senders: Sequence[subprocess.Popen]) -> None:
    for sender in senders:
        with contextlib.suppress(ProcessLookupError):
            sender.send_signal(signal.SIGCONT)


def kill9_mid_ingest(node: peers.CompacsProcess, files: list[Path], at: int, log: Path) -> dict:
    """Send `files` with storescu, kill -9 the node once `at` are acknowledged (the sender
    frozen with files left to send), let the sender finish against the dead node; what it
    saw acknowledged."""
    sender = start_storescu(node, files, log)
    try:
        freeze_after([sender], [log], at)
        assert sender.poll() is None  # frozen with files left to send
        node.kill9()  # the whole process group: the node and its compression workers
    finally:
        thaw([sender])
    sender.wait(timeout=120)
    acknowledged = successes(log)
    assert at <= len(acknowledged) < len(files), len(acknowledged)
    return acknowledged


def check_acknowledged_kept(node: peers.CompacsProcess, acknowledged: dict, out: Path) -> None:
    """After a restart: every acknowledged instance exported bit-exact, verify clean."""
    stats = wait_compressed(node, len(acknowledged))
    res = node.export(out)
    assert res.returncode == 0, res.stderr
    exported = exported_by_sop(out)
    for path in acknowledged:
        src = pydicom.dcmread(path)
        assert src.SOPInstanceUID in exported, f"acknowledged {path} lost"
        got = pydicom.dcmread(exported[src.SOPInstanceUID])
        assert np.array_equal(got.pixel_array, src.pixel_array)
    # unacknowledged ones may or may not be there, but never half: verify checks every row
    assert stats["instances"] >= len(acknowledged)
    verify = node.verify()
    assert verify.returncode == 0, verify.stdout


def test_kill9_mid_ingest_loses_no_acknowledged_instance(make_node, tmp_path: Path) -> None:
    node = make_node()
    files = dicomdata.ct_series(tmp_path / "ct", 200)
    acknowledged = kill9_mid_ingest(node, files, 40, tmp_path / "storescu.log")
    node.start()
    check_acknowledged_kept(node, acknowledged, tmp_path / "out")


def test_sigterm_finishes_and_exits_zero(make_node, tmp_path: Path) -> None:
    node = make_node()
    files = dicomdata.ct_series(tmp_path / "ct", 30)
    log = tmp_path / "storescu.log"
    sender = start_storescu(node, files, log)
    while not successes(log) and sender.poll() is None:
        time.sleep(0.01)
    assert node.stop() == 0
    sender.wait(timeout=60)
    acknowledged = successes(log)
    node.start()
    stats = wait_compressed(node, len(acknowledged))
    assert stats["instances"] >= len(acknowledged)
    assert node.verify().returncode == 0


def test_checksum_catches_a_damaged_blob(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    files = dicomdata.ct_series(tmp_path / "ct", 2)
    res = compacs_node.store(files)
    assert peers.store_ok(res, files)
    wait_compressed(compacs_node, 2)
    blobs = sorted((compacs_node.data_dir / "archive" / "hot").rglob("*.dcm"))
    assert len(blobs) == 2
    data = bytearray(blobs[0].read_bytes())
    data[-100] ^= 0xFF
    blobs[0].write_bytes(bytes(data))
    res = compacs_node.verify()
    assert res.returncode == 1
    assert "checksum mismatch" in res.stdout and "1 problem" in res.stdout
    orphan = compacs_node.data_dir / "archive" / "hot" / "stray.dcm"
    orphan.write_bytes(b"x")
    res = compacs_node.verify()
    assert "orphan" not in res.stdout  # young: it could be a live node's write in progress
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    res = compacs_node.verify()
    assert "orphan blob hot/stray.dcm" in res.stdout and "2 problem" in res.stdout
