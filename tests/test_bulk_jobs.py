"""Invariant 7: one bad object never stops a bulk job; and the compression jobs of ingest
count their failures, park what always fails, and survive a worker that dies.

Worker processes are paused (SIGSTOP) where a test needs jobs to wait: real processes, real
signals, no injected faults.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import dicomdata
import edge_corpus
import peers
import psutil
import pydicom
from nodecheck import exported_by_sop, job_rows, wait_compressed

FAST_RETRY = "[ingest]\nretry_seconds = 0.3\nmax_attempts = 3\n"


def workers(node: peers.CompacsProcess) -> list[psutil.Process]:
    """The node's compression worker processes (multiprocessing's spawned children)."""
    children = psutil.Process(node.pid).children()
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


@contextlib.contextmanager
def paused(procs: list[psutil.Process]) -> Iterator[None]:
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)


def test_export_goes_on_past_a_damaged_blob(compacs_node, tmp_path: Path) -> None:
    files = dicomdata.ct_series(tmp_path / "ct", 3)
    assert peers.store_ok(compacs_node.store(files), files)
    wait_compressed(compacs_node, 3)
    blob = sorted((compacs_node.data_dir / "archive" / "hot").rglob("*.dcm"))[1]
    data = bytearray(blob.read_bytes())
    data[-50] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    res = compacs_node.export(out)
    assert res.returncode == 1
    assert len(exported_by_sop(out)) == 2
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "checksum mismatch" in failed[0], res.stdout
    assert "exported 2 instance(s)" in res.stdout and "1 failed" in res.stdout


def test_rle_with_rows_halved_is_kept_flagged_and_never_requeued(make_node, tmp_path: Path) -> None:
    """The RLE decoder panics (pyo3 PanicException, a BaseException) on it: acknowledged,
    stored as received and flagged; not compressed again at the next start; verify lists
    it; export writes it as stored (listed) and exports everything else."""
    node = make_node()
    src = dicomdata.fresh_copy("emri_small_RLE.dcm", tmp_path)
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Rows // 2
    ds.save_as(src)
    good = dicomdata.ct_series(tmp_path / "ct", 1)
    assert edge_corpus.send_as_stored(src, node.port, node.ae_title) == 0
    assert peers.store_ok(node.store(good), good)
    stats = wait_compressed(node, 2)
    assert stats["flagged"] == 1 and stats["parked"] == 0, stats
    assert "pixel data does not decode" in node.log_text()
    before = job_rows(node)
    node.stop()
    node.start()
    stats = wait_compressed(node, 2)
    assert stats["pending"] == 0 and stats["flagged"] == 1
    assert job_rows(node) == before  # the restart ran no job again: no attempt, no new version
    verify = node.verify()
    assert verify.returncode == 1
    assert f"SOP {ds.SOPInstanceUID}" in verify.stdout and "flagged" in verify.stdout
    out = tmp_path / "out"
    res = node.export(out)
    assert res.returncode == 0, res.stdout  # the default syntax: as stored where it must
    exported = exported_by_sop(out)
    assert pydicom.dcmread(good[0]).SOPInstanceUID in exported
    assert pydicom.dcmread(exported[ds.SOPInstanceUID]).PixelData == ds.PixelData
    assert f"AS STORED SOP {ds.SOPInstanceUID} " in res.stdout
    res = node.export(tmp_path / "explicit", transfer_syntax="1.2.840.10008.1.2.1")
    assert res.returncode == 1  # asked for explicitly: that object fails
    assert f"FAILED SOP {ds.SOPInstanceUID} " in res.stdout
    res = node.export(tmp_path / "as-stored", transfer_syntax="stored")
    assert res.returncode == 0  # as stored, it exports


def test_a_killed_worker_is_replaced_and_its_jobs_finish(make_node, tmp_path: Path) -> None:
    node = make_node(FAST_RETRY)
    files = dicomdata.ct_series(tmp_path / "ct", 4)
    procs = workers(node)
    assert procs, "no compression workers found"
    with paused(procs):
        assert peers.store_ok(node.store(files), files)  # acknowledged, jobs queued
        os.kill(procs[0].pid, signal.SIGKILL)  # a codec crash, as the pool sees it
    stats = wait_compressed(node, 4)
    assert stats["parked"] == 0 and stats["by_codec"]["jpegls"]["instances"] == 4, stats
    assert "a compression worker died: starting a new worker pool" in node.log_text()
    more = dicomdata.ct_series(tmp_path / "ct2", 3)
    assert peers.store_ok(node.store(more), more)  # later C-STOREs succeed and compress
    stats = wait_compressed(node, 7)
    assert stats["by_codec"]["jpegls"]["instances"] == 7
    assert set(workers(node)) & set(procs) == set()  # the whole pool is new


def test_an_object_that_always_fails_is_parked_with_its_reason(make_node, tmp_path: Path) -> None:
    """Its received blob is damaged on disk before the job reads it: every attempt fails on
    the checksum. After max_attempts the object is parked, listed by stats and verify."""
    node = make_node(FAST_RETRY)
    files = dicomdata.ct_series(tmp_path / "ct", 2)
    with paused(workers(node)):
        assert peers.store_ok(node.store(files[:1]), files[:1])
        (incoming,) = (node.data_dir / "archive" / "incoming").glob("*.dcm")
        data = bytearray(incoming.read_bytes())
        data[-10] ^= 0xFF
        incoming.write_bytes(bytes(data))
    assert peers.store_ok(node.store(files[1:]), files[1:])
    stats = wait_compressed(node, 2)
    assert stats["parked"] == 1, stats
    log = node.log_text()
    assert log.count("ChecksumError") >= 3 and "failed 3 times, parked" in log
    verify = node.verify()
    assert "parked, compression failed: ChecksumError" in verify.stdout, verify.stdout
    before = job_rows(node)
    assert before[str(pydicom.dcmread(files[0]).SOPInstanceUID)]["attempts"] == 3
    node.stop()
    node.start()  # parked objects are not retried at every start
    assert wait_compressed(node, 2)["parked"] == 1
    assert job_rows(node) == before  # still parked after 3 attempts, its row untouched
