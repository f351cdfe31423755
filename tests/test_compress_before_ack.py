"""Compression before the ack (`[ingest] compress_before_ack_from`, service/ingest.py).

When several senders store at once and a worker is free, an object is compressed, verified
and written once, compressed, before its ack. These tests hold it to the invariants the
default path is held to: acknowledged means durable and indexed (kill -9), bit-exact, one bad
object (a codec that kills its worker) never costs the others, and every failure on this
path sends the object down the default one instead of refusing it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
from io import BytesIO
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop
from test_durability import check_acknowledged_kept, kill9_mid_ingest
from test_jobs import files_on_disk, make_service, pixels, receive, row
from test_problems import CRASH_CONFIG, CRASH_PLUGIN, attempts, wait_for
from test_tiering import Inline

from compacs.service import handoff
from compacs.service import ingest as ingest_module
from compacs.service import jobs as jobs_module
from compacs.service.archive_service import ArchiveService
from compacs.service.jobs import JobError, Jobs

BEFORE_ACK = "[ingest]\ncompress_before_ack_from = 1\n"


def now_service(tmp_path: Path, least: int = 1) -> ArchiveService:
    service, _ = make_service(tmp_path)
    config = service.config
    config.ingest = dataclasses.replace(config.ingest, compress_before_ack_from=least)
    service.jobs.executor.shutdown()
    jobs = Jobs(config, service.archive, service.index, "test-node:1", lambda: Inline())
    service.jobs = service.ingest.jobs = jobs
    return service


@pytest.fixture
def ct(tmp_path: Path) -> bytes:
    (path,) = dicomdata.ct_series(tmp_path / "ct", 1)
    return path.read_bytes()


def test_stored_compressed_at_the_ack_written_once(tmp_path: Path, ct: bytes) -> None:
    service = now_service(tmp_path)
    try:
        assert receive(service, ct) == 0
        stored = row(service)
        assert (stored.state, stored.codec, stored.claimed_by, stored.version) == (
            "stored",
            "jpegls",
            None,
            0,
        )
        assert stored.received_size == len(ct) > stored.stored_size == stored.blob.size
        assert stored.stored_at is not None
        assert files_on_disk(service) == {stored.blob.path} == service.index.blob_paths()
        assert not stored.blob.path.startswith("incoming")
        assert np.array_equal(pixels(service, stored), pydicom.dcmread(BytesIO(ct)).pixel_array)
        assert receive(service, ct) == 0  # a re-send: acknowledged, still one row
        assert len(service.index.instances()) == 1
    finally:
        service.close()


def test_a_failed_attempt_takes_the_default_path(
    tmp_path: Path, ct: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(arrival):  # noqa: ANN001, ANN202
        assert arrival.raw == ct and arrival.handoff is None  # in-process: no shared memory
        Path(service.archive.abspath(arrival.stored)).write_bytes(b"half")  # then fails
        raise JobError("the codec failed")

    service = now_service(tmp_path)
    try:
        monkeypatch.setattr(jobs_module, "run_arrival", failing)
        assert receive(service, ct) == 0
        inst = row(service)  # queued as received, compressed at once by Inline
        assert (inst.state, inst.codec) == ("stored", "jpegls")
        assert files_on_disk(service) - {inst.blob.path} <= {
            p for p in files_on_disk(service) if p.startswith("incoming")
        }, "the failed attempt's file was left behind"
        assert np.array_equal(pixels(service, inst), pydicom.dcmread(BytesIO(ct)).pixel_array)
    finally:
        service.close()


def test_a_backlog_takes_the_default_path(tmp_path: Path) -> None:
    """Jobs queued for the workers (BACKLOG_PER_WORKER a worker): the next object is not
    made to wait behind them for its ack."""
    files = dicomdata.ct_series(tmp_path / "ct", jobs_module.BACKLOG_PER_WORKER + 1)
    service, steps = make_service(tmp_path, "[node]\nworkers = 1\n")
    try:
        for path in files[:-1]:  # their jobs wait: this executor runs them when told
            assert receive(service, path.read_bytes()) == 0
        service.config.ingest = dataclasses.replace(
            service.config.ingest, compress_before_ack_from=1
        )
        assert receive(service, files[-1].read_bytes()) == 0  # not now: a backlog
        assert {i.state for i in service.index.instances()} == {"pending"}
        for _ in files:
            steps.run_one()
        assert {i.state for i in service.index.instances()} == {"stored"}
    finally:
        service.close()


def test_only_several_senders_at_once_compress_before_the_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = now_service(tmp_path, least=2)
    clock = [1000.0]
    monkeypatch.setattr(ingest_module.time, "monotonic", lambda: clock[0])
    try:
        ingest = service.ingest
        assert not ingest._compress_now(b"x", [])  # one sender
        answers: list[bool] = []
        other = threading.Thread(target=lambda: answers.append(ingest._compress_now(b"x", [])))
        other.start()
        other.join()
        assert answers == [True]  # a second sender within the window
        assert ingest._compress_now(b"x", [])
        too_big = bytes(ingest_module.STREAM_ABOVE + 1)  # compressed from its file instead
        assert not ingest._compress_now(too_big, [])
        clock[0] += ingest_module.SENDER_WINDOW + 0.1
        assert not ingest._compress_now(b"x", [])  # the other went quiet
    finally:
        service.close()


def test_one_sender_takes_the_default_path(tmp_path: Path, ct: bytes) -> None:
    """With the default setting (two senders at once) one sender's object is acknowledged
    as received, without waiting for a worker (this executor runs jobs only when told)."""
    service, steps = make_service(tmp_path)
    try:
        service.config.ingest = dataclasses.replace(
            service.config.ingest, compress_before_ack_from=2
        )
        assert receive(service, ct) == 0
        assert row(service).state == "pending"
        steps.run_one()
        assert row(service).state == "stored"
    finally:
        service.close()


def test_a_rule_that_may_derive_a_lossy_instance_takes_the_default_path(tmp_path: Path) -> None:
    """jobs.py records a bounded-error result as a new, derived instance: never here."""
    lossy = 'name = "lossy"\nmatch = { Modality = "CT" }\n'
    lossy += 'codecs = [{ codec = "learned", params = { delta = 2 } }, "jpegls"]\n'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    service, _ = make_service(tmp_path / "a", f"[[rules]]\n{lossy}")
    plain, _ = make_service(tmp_path / "b")
    try:
        (path,) = dicomdata.ct_series(tmp_path / "ct", 1)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert service.ingest._may_derive(ds, "MODALITY")
        assert not plain.ingest._may_derive(ds, "MODALITY")
        ds.Modality = "MR"
        assert not service.ingest._may_derive(ds, "MODALITY")  # another rule
    finally:
        service.close()
        plain.close()


def test_handoff_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handoff, "HANDOFF_DIR", tmp_path)
    path = handoff.write(b"DICM" * 1000)
    assert path is not None and handoff.read(path) == b"DICM" * 1000
    assert Path(path).stat().st_mode & 0o777 == 0o600  # patient data: this user only
    handoff.remove(path)
    handoff.remove(path)  # twice: no error
    assert not list(tmp_path.iterdir())
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"compacs-handoff-{dead.pid}-00").write_bytes(b"x")
    live = tmp_path / f"compacs-handoff-{os.getpid()}-00"
    live.write_bytes(b"x")
    assert handoff.sweep_dead() == 1
    assert [p.name for p in tmp_path.iterdir()] == [live.name]
    monkeypatch.setattr(handoff, "HANDOFF_DIR", tmp_path / "missing")
    assert handoff.write(b"x") is None  # the caller sends the bytes through the pipe


def handoff_files(pid: int) -> list[Path]:
    return list(handoff.HANDOFF_DIR.glob(f"compacs-handoff-{pid}-*"))


# --------------------------------------------------------------------------- a real node


def test_a_node_stores_bit_exact_before_the_ack(make_node, tmp_path: Path) -> None:
    node = make_node(BEFORE_ACK)
    ct = dicomdata.ct_series(tmp_path / "ct", 20)
    samples = dicomdata.sample_files(tmp_path / "samples", ["multiframe", "signed12", "rgb"])
    files = ct + list(samples.values())
    assert peers.store_ok(node.store(files), files)
    stats = node.stats()
    assert stats["pending"] == 0, stats  # every ack came after its compression
    assert node.log_text().count("before the ack") == len(files)
    assert not list((node.data_dir / "archive" / "incoming").glob("*.dcm"))
    assert handoff_files(node.pid) == []  # each removed once its object was stored
    rows = attempts(node)
    for path in ct:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert rows[sop] == ("stored", 0, "jpegls")
    out = tmp_path / "out"
    assert node.export(out).returncode == 0
    exported = exported_by_sop(out)
    for path in files:
        src = pydicom.dcmread(path)
        got = pydicom.dcmread(exported[src.SOPInstanceUID])
        assert np.array_equal(got.pixel_array, src.pixel_array)
    assert node.verify().returncode == 0


def test_kill9_before_the_ack_loses_no_acknowledged_instance(make_node, tmp_path: Path) -> None:
    node = make_node(BEFORE_ACK)
    files = dicomdata.ct_series(tmp_path / "ct", 120)
    killed = node.pid
    acknowledged = kill9_mid_ingest(node, files, 30, tmp_path / "storescu.log")
    node.start()
    check_acknowledged_kept(node, acknowledged, tmp_path / "out")
    assert handoff_files(killed) == []  # what the killed node left, swept at the start


def test_a_worker_killed_before_the_ack_costs_only_its_object(make_node, tmp_path: Path) -> None:
    import os

    path = os.pathsep.join(filter(None, [str(CRASH_PLUGIN), os.environ.get("PYTHONPATH")]))
    config = CRASH_CONFIG.replace("[ingest]\n", "[ingest]\ncompress_before_ack_from = 1\n")
    node = make_node(config, env={"PYTHONPATH": path})
    culprit = dicomdata.ct_series(tmp_path / "culprit", 1)
    innocent = dicomdata.ct_series(tmp_path / "innocent", 4)
    assert peers.store_ok(node.store(culprit, aet="CRASHER"), culprit)  # acked all the same
    assert peers.store_ok(node.store(innocent), innocent)
    assert "compression before the ack failed (BrokenProcessPool" in node.log_text()
    culprit_uid = str(pydicom.dcmread(culprit[0], stop_before_pixels=True).SOPInstanceUID)
    rows = wait_for(lambda: (r := attempts(node)) and r[culprit_uid][0] == "parked" and r)
    assert rows[culprit_uid][1] == 3  # charged by the default path's isolation, not more
    innocent_rows = [v for k, v in rows.items() if k != culprit_uid]
    assert [(state, codec) for state, _, codec in innocent_rows] == [("stored", "jpegls")] * 4
