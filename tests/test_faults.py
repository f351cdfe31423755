"""Faults under real senders: a disk that fills mid-stream, kill -9 in the middle of a
C-MOVE, and a hundred idle associations beside a trickling sender.

What test_durability.py (kill -9 mid-ingest), test_tiering_node.py (kill -9 mid tier run),
test_bad_input.py (0xA700 on one pynetdicom association, the index off the full disk) and
test_limits.py (each limit alone) already show is not repeated here; these put the faults
where a hospital meets them: DCMTK's storescu, movescu and storescp as the peers, the
node's default layout (index and archive on the one disk that fills), several senders at
once.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, wait_compressed
from test_durability import start_storescu
from test_limits import _raw_association

OUT_OF_RESOURCES = "Refused: OutOfResources"


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``path``: a disk that really fills (skips where mount is
    not allowed, i.e. not root)."""
    path.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_refuses_with_a700_and_keeps_all_it_acknowledged(
    make_node, tmp_path: Path
) -> None:
    """Three storescu associations fill the disk that holds the archive *and* the SQLite
    index. Every C-STORE gets Success or 0xA700, the node keeps running; once space is freed
    the refused files are sent again, and everything is there, compressed and exact."""
    with small_tmpfs(tmp_path / "small", 64) as small:
        node = make_node(
            "[ingest]\nretry_seconds = 1\n[storage]\ndelete_grace_seconds = 1\n",
            data_dir=small / "data",
            log_path=tmp_path / "node.log",  # off the small disk, which the test unmounts
        )
        try:
            filler = small / "filler"  # leaves ~10 MiB: less than the 75 objects need compressed
            filler.write_bytes(b"\x00" * (54 << 20))
            groups = [
                dicomdata.ct_series(tmp_path / f"ct{i}", 25, prefix=f"d{i}") for i in range(3)
            ]  # 3 x 25 x 512 KiB as received
            logs = [tmp_path / f"storescu{i}.log" for i in range(3)]
            senders = [
                start_storescu(node, files, log) for files, log in zip(groups, logs, strict=True)
            ]
            for sender in senders:
                sender.wait(timeout=600)
            results = {
                path: outcome
                for log in logs
                for path, outcome in peers.parse_storescu_log(log.read_text()).items()
            }
            files = [f for group in groups for f in group]
            assert set(results) == {str(f) for f in files}, "storescu skipped files"
            assert set(results.values()) <= {"Success", OUT_OF_RESOURCES}, set(results.values())
            refused = [f for f in files if results[str(f)] == OUT_OF_RESOURCES]
            assert refused, "the disk never filled"
            assert len(refused) < len(files)
            assert node.running, node.log_tail()
            assert "disk full" in node.log_text()
            # three senders at once: objects were compressed before their ack too, and that
            # path fell back to the acknowledge-first one (hence 0xA700) once the disk was full
            assert "before the ack" in node.log_text()

            filler.unlink()  # space returns: what was refused can be sent again
            again = node.store(refused)
            assert peers.store_ok(again, refused), again.stdout[-3000:]
            stats = wait_compressed(node, len(files), timeout=300)
            assert stats["instances"] == len(files)
            out = tmp_path / "out"  # off the small disk
            res = node.export(out)
            assert res.returncode == 0, res.stderr[-3000:]
            exported = exported_by_sop(out)
            assert len(exported) == len(files)
            pixels = dicomdata.ct_slice_pixels()
            for sop, path in exported.items():
                assert np.array_equal(pydicom.dcmread(path).pixel_array, pixels), sop
            verify = node.verify()
            assert verify.returncode == 0, verify.stdout[-3000:]
        finally:
            node.stop()  # before the disk goes away under it
    assert "Traceback" not in node.log_text()


def _slices_until(proc: peers.ManagedProcess, done, deadline_s: float = 120) -> None:
    """Run a stopped process in 20 ms slices (SIGCONT, sleep, SIGSTOP) until ``done()``,
    and leave it stopped: puts a fault between two of its steps by construction."""
    deadline = time.monotonic() + deadline_s  # a deadline, not a measure
    while not done():
        assert time.monotonic() < deadline, "the process made no progress"
        proc.proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
        proc.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.01)


def _move(node: peers.CompacsProcess, study: str, dest: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", node.ae_title, "-aem", dest,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            node.host, str(node.port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=peers.dcmtk_env(),
    )  # fmt: skip


def _whole_objects(received: list[Path], sent: set[str]) -> set[str]:
    """Each received file parses to its end with the exact pixels of a sent instance."""
    pixels = dicomdata.ct_slice_pixels()
    got = set()
    for path in received:
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID in sent, path
        assert np.array_equal(ds.pixel_array, pixels), path
        got.add(str(ds.SOPInstanceUID))
    return got


def test_kill9_during_a_cmove_loses_nothing_and_a_retry_completes(
    make_node, make_storescp, tmp_path: Path
) -> None:
    first, retry = make_storescp("FIRSTSCP"), make_storescp("RETRYSCP")
    node = make_node(
        "[move_destinations]\n"
        f'FIRSTSCP = "127.0.0.1:{first.port}"\nRETRYSCP = "127.0.0.1:{retry.port}"\n'
    )
    files = dicomdata.ct_series(tmp_path / "ct", 40)
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert peers.store_ok(node.store(files), files)
    wait_compressed(node, len(files))

    first.proc.send_signal(signal.SIGSTOP)  # the destination takes objects only in slices
    try:
        mover = _move(node, study, "FIRSTSCP")
        _slices_until(first, lambda: len(first.received()) >= 5)
        node.kill9()  # the node and its workers, with sub-operations still to go
    finally:
        first.proc.send_signal(signal.SIGCONT)
    out, _ = mover.communicate(timeout=120)
    assert "Final Move Response (Success)" not in out, out[-3000:]
    time.sleep(1)  # storescp writes what it had whole; a cut object it drops
    partial = _whole_objects(first.received(), sent)
    assert 5 <= len(partial) < len(files), len(partial)

    node.start()
    assert node.stats()["instances"] == len(files)
    verify = node.verify()
    assert verify.returncode == 0, verify.stdout[-3000:]
    out, _ = _move(node, study, "RETRYSCP").communicate(timeout=300)
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    assert _whole_objects(retry.received(), sent) == sent
    assert len(retry.received()) == len(files)


TRICKLED_PDU_BYTES = 100_000
MODALITY_FILES = 20


def test_idle_associations_and_a_trickler_do_not_lock_out_a_modality(
    make_node, tmp_path: Path
) -> None:
    """100 associations that say nothing after the A-ASSOCIATE (25 loopback addresses, 4
    titles each) and one sender trickling a P-DATA-TF a byte at a time, within limits that
    allow them: a storescu from a third AE title still stores and an echoscu answers, and
    none of the idle associations is cut (there were slots for everyone)."""
    node = make_node(
        "[limits]\nmax_associations = 128\nidle_timeout = 300\npdu_read_timeout = 300\n"
    )
    idle: list[socket.socket] = []
    trickler = None
    try:
        for i in range(100):
            sock, pdu_type = _raw_association(node, b"IDLE%03d" % i, f"127.0.0.{2 + i // 4}")
            idle.append(sock)
            assert pdu_type == 0x02, f"idle association {i} refused"
        trickler, pdu_type = _raw_association(node, b"TRICKLER", "127.0.0.200")
        assert pdu_type == 0x02
        trickler.sendall(struct.pack(">BxI", 0x04, TRICKLED_PDU_BYTES))
        files = dicomdata.ct_series(tmp_path / "ct", MODALITY_FILES)
        log = tmp_path / "storescu.log"
        sender = start_storescu(node, files, log)
        while sender.poll() is None:  # a byte between the modality's stores
            trickler.sendall(b"\0")
            time.sleep(0.05)
        results = peers.parse_storescu_log(log.read_text())
        assert all(results.get(str(f)) == "Success" for f in files), log.read_text()[-3000:]
        assert node.echo(aet="MODALITY2").returncode == 0
        trickler.sendall(b"\0")  # the trickler is still being read, not cut off
        for i, sock in enumerate(idle):  # nobody was evicted: nothing arrived, none closed
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                assert sock.recv(1) != b"", f"idle association {i} was closed"
                raise AssertionError(f"idle association {i} got a PDU")
    finally:
        for sock in [*idle, *([trickler] if trickler else [])]:
            sock.close()
    assert wait_compressed(node, MODALITY_FILES)["instances"] == MODALITY_FILES
    log_text = node.log_text()
    assert "evicted" not in log_text and "reached" not in log_text
    assert "Traceback" not in log_text
