"""The ingest state machine in-process: claims, compare-and-swap, retry, park, recovery, and
two receivers of one SOP Instance at once.

The compression jobs run in an injected executor that runs one queued job when the test
says so (no subprocess, no timing): each test decides the order in which things happen. The
images are real (a CT slice), and so are the index (SQLite), the archive and the codecs.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from io import BytesIO
from pathlib import Path

import dicomdata
import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update

from compacs.service.archive_service import ArchiveService
from compacs.service.config import load_config
from compacs.service.jobs import Jobs
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Blob, Index, Instance

CT = "1.2.840.10008.5.1.4.1.1.2"


class StepExecutor(Executor):
    """Runs the queued jobs one at a time, in the calling thread, when told to."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        future: Future = Future()
        self.queue.put((future, fn, args, kwargs))
        return future

    def run_one(self) -> Future:
        future, fn, args, kwargs = self.queue.get(timeout=30)  # a deadline, not a measure
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - what a worker would report
                future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        while cancel_futures and not self.queue.empty():
            self.queue.get()[0].cancel()


def make_service(
    tmp_path: Path, config_text: str = "", owner: str = "test-node:1"
) -> tuple[ArchiveService, StepExecutor]:
    cfg = tmp_path / "compacs.toml"
    # The deferred path these tests step through; compressing before the ack is
    # tests/test_compress_before_ack.py's.
    cfg.write_text("[ingest]\nretry_seconds = 0.01\ncompress_before_ack_from = 0\n" + config_text)
    config = load_config(cfg, env={}, overrides={"data_dir": str(tmp_path / "data")})
    config.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index.open(config.effective_index_url, create=True)
    archive = Archive(config.data_dir / "archive")
    executor = StepExecutor()
    jobs = Jobs(config, archive, index, owner, executor_factory=lambda: executor)
    return ArchiveService(config, archive, index, jobs), executor


@pytest.fixture
def ct(tmp_path: Path) -> bytes:
    (path,) = dicomdata.ct_series(tmp_path / "ct", 1)
    return path.read_bytes()


def receive(service: ArchiveService, raw: bytes) -> int:
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
    return service.receive(raw, "MODALITY", CT, str(ds.SOPInstanceUID))


def changed(raw: bytes) -> bytes:
    """The same SOP Instance with one pixel changed (a correction re-sent)."""
    ds = pydicom.dcmread(BytesIO(raw))
    arr = ds.pixel_array.copy()
    arr[5, 5] += 3
    ds.PixelData = arr.tobytes()
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def row(service: ArchiveService) -> Instance:
    (inst,) = service.index.instances()
    return inst


def files_on_disk(service: ArchiveService) -> set[str]:
    return set(service.archive.blobs())


def pixels(service: ArchiveService, inst: Instance) -> np.ndarray:
    return pydicom.dcmread(BytesIO(service.read_instance(inst))).pixel_array


@pytest.fixture
def services() -> Iterator[list[ArchiveService]]:
    opened: list[ArchiveService] = []
    yield opened
    for service in opened:
        service.close()


def test_received_claimed_compressed_and_the_received_blob_swept(tmp_path, ct, services) -> None:
    service, steps = make_service(tmp_path)
    services.append(service)
    assert receive(service, ct) == 0
    pending = row(service)
    assert (pending.state, pending.claimed_by, pending.version) == ("pending", "test-node:1", 0)
    received_blob = pending.blob.path
    steps.run_one()
    stored = row(service)
    assert (stored.state, stored.codec, stored.claimed_by, stored.version) == (
        "stored",
        "jpegls",
        None,
        1,
    )
    assert stored.blob.path != received_blob
    # released, not deleted: a C-GET that read the row before the swap still finds it
    assert received_blob in files_on_disk(service)
    assert service.sweep() == 0  # within the grace period
    with service.index.writing() as s:
        s.execute(update(Blob).values(released_at=Blob.created_at))  # long ago
    service.config.storage = dataclasses.replace(service.config.storage, delete_grace_seconds=0)
    assert service.sweep() == 1
    assert files_on_disk(service) == {stored.blob.path} == service.index.blob_paths()
    assert np.array_equal(pixels(service, stored), pydicom.dcmread(BytesIO(ct)).pixel_array)


def test_replace_during_compression_keeps_the_newer_and_drops_the_older_result(
    tmp_path, ct, services
) -> None:
    service, steps = make_service(tmp_path, '[node]\non_duplicate = "replace"\n')
    services.append(service)
    assert receive(service, ct) == 0
    newer = changed(ct)
    assert receive(service, newer) == 0  # while the first one's job still waits
    assert row(service).version == 1
    steps.run_one()  # the first version's job: its claim is at version 0, gone
    first_try = row(service)
    assert first_try.state == "pending"
    steps.run_one()  # the newer version's job
    stored = row(service)
    assert (stored.state, stored.version) == ("stored", 2)
    assert np.array_equal(pixels(service, stored), pydicom.dcmread(BytesIO(newer)).pixel_array)
    # the first job's output was deleted (nobody points at it); both received blobs are
    # released, waiting for the sweep: nothing on disk is unknown to the index
    assert files_on_disk(service) <= service.index.blob_paths()
    assert len(files_on_disk(service)) == 3


def test_a_failing_job_is_retried_then_parked(tmp_path, ct, services) -> None:
    service, steps = make_service(tmp_path, "max_attempts = 3\n")
    services.append(service)
    assert receive(service, ct) == 0
    path = service.archive.abspath(row(service).blob.path)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # damaged on disk
    for attempt in (1, 2):
        assert steps.run_one().exception() is not None
        inst = row(service)
        assert (inst.state, inst.attempts) == ("pending", attempt)
        assert "checksum mismatch" in inst.last_error
    steps.run_one()  # the third: parked, the claim ends
    inst = row(service)
    assert (inst.state, inst.attempts, inst.claimed_by) == ("parked", 3, None)
    assert service.index.stats()["parked"] == 1
    assert steps.queue.empty()  # not retried any more


def test_a_retry_that_succeeds_counts_the_failed_attempt(tmp_path, ct, services) -> None:
    service, steps = make_service(tmp_path)
    services.append(service)
    assert receive(service, ct) == 0
    path = service.archive.abspath(row(service).blob.path)
    good = path.read_bytes()
    path.write_bytes(b"")
    assert steps.run_one().exception() is not None
    path.write_bytes(good)  # the disk is back
    steps.run_one()
    inst = row(service)
    assert (inst.state, inst.attempts, inst.codec) == ("stored", 1, "jpegls")


def test_a_result_the_full_index_refused_is_recorded_once_there_is_room(
    tmp_path, ct, services, monkeypatch
) -> None:
    """The index on a full disk refuses to record a finished compression: the object stays
    pending under this process' claim (renewed while it lives, so no other process takes
    it), and unless this process tries again it stays so for good. It is tried again,
    uncharged, and its refused output is no orphan."""
    import sqlite3

    import sqlalchemy.exc

    service, steps = make_service(tmp_path)
    services.append(service)
    assert receive(service, ct) == 0
    real = service.index.mark_stored
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    sqlite_full.sqlite_errorcode = sqlite3.SQLITE_FULL  # as the driver sets it
    full = sqlalchemy.exc.OperationalError("UPDATE instance", {}, sqlite_full)
    calls = []

    def refuse_once(*args, **kwargs):  # noqa: ANN202 - what the real one returns
        calls.append(args)
        if len(calls) == 1:
            raise full
        return real(*args, **kwargs)

    monkeypatch.setattr(service.index, "mark_stored", refuse_once)
    steps.run_one()  # compressed, then refused by the full index
    assert row(service).state == "pending"
    assert files_on_disk(service) == service.index.blob_paths()  # the output was removed
    steps.run_one()  # the retry, queued after retry_seconds
    inst = row(service)
    assert (inst.state, inst.attempts, inst.codec, inst.claimed_by) == (
        "stored", 0, "jpegls", None
    )  # fmt: skip
    assert np.array_equal(pixels(service, inst), pydicom.dcmread(BytesIO(ct)).pixel_array)


def test_a_result_the_index_refuses_otherwise_is_charged_and_retried(
    tmp_path, ct, services, monkeypatch
) -> None:
    """Any other refusal to record a result (a bug, a lost connection) is charged as a failed
    attempt, so that the object is retried and, if it keeps failing, parked: never left
    pending under a claim nobody works on."""
    service, steps = make_service(tmp_path)
    services.append(service)
    assert receive(service, ct) == 0
    real = service.index.mark_stored
    calls = []

    def refuse_once(*args, **kwargs):  # noqa: ANN202 - what the real one returns
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the index said no")
        return real(*args, **kwargs)

    monkeypatch.setattr(service.index, "mark_stored", refuse_once)
    steps.run_one()
    inst = row(service)
    assert (inst.state, inst.attempts) == ("pending", 1)
    assert "the index said no" in inst.last_error
    steps.run_one()  # the retry
    assert (row(service).state, row(service).attempts) == ("stored", 1)


def test_recovery_leaves_a_live_foreign_claim_and_takes_an_expired_one(
    tmp_path, ct, services
) -> None:
    """Two processes on one index and archive: the other received the object and holds its
    claim. While its lease runs, ours takes nothing; once it ran out (the other died), ours
    takes over, and the other's late result is discarded, not half-recorded."""
    other, other_steps = make_service(tmp_path, owner="other-node:2")
    ours, our_steps = make_service(tmp_path, owner="test-node:1")
    services.extend([other, ours])
    assert receive(other, ct) == 0
    assert ours.recover() == 0 and our_steps.queue.empty()
    with ours.index.writing() as s:
        s.execute(update(Instance).values(lease_until=Instance.received_at))  # expired
    assert ours.recover() == 1
    our_steps.run_one()
    assert (row(ours).state, row(ours).version) == ("stored", 1)
    other_steps.run_one()  # the other process, alive after all, finishes late
    inst = row(ours)
    assert (inst.state, inst.version) == ("stored", 1)
    assert files_on_disk(ours) <= ours.index.blob_paths()  # its result was deleted
    assert np.array_equal(pixels(ours, inst), pydicom.dcmread(BytesIO(ct)).pixel_array)


def test_the_same_instance_received_twice_at_once_is_one_row(tmp_path, ct, services) -> None:
    """Both receivers find no row, both write their blob, one insert wins; the other sees the
    unique key, takes it for a re-send of the same data set and deletes its own blob."""
    service, steps = make_service(tmp_path)
    services.append(service)
    statuses: list[int] = []
    incoming = service.archive.root / "incoming"
    with service.index.write_lock:  # both stop at their insert, blobs written
        threads = [threading.Thread(target=lambda: statuses.append(receive(service, ct)))]
        threads.append(threading.Thread(target=lambda: statuses.append(receive(service, ct))))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30  # a deadline, not a measure
        while len(list(incoming.glob("*.dcm"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(incoming.glob("*.dcm"))) == 2
    for thread in threads:
        thread.join(timeout=30)
    assert statuses == [0, 0]
    assert len(service.index.instances()) == 1
    assert files_on_disk(service) == service.index.blob_paths()  # the loser's blob is gone
    steps.run_one()
    assert steps.queue.empty() and row(service).state == "stored"


def test_recovery_removes_only_files_older_than_a_lease(tmp_path, ct, services) -> None:
    service, _steps = make_service(tmp_path, "lease_seconds = 60\n")
    services.append(service)
    young = service.archive.abspath("incoming/young.dcm")
    old = service.archive.abspath("incoming/old.dcm")
    young.write_bytes(b"a write in progress")
    old.write_bytes(b"a crash's leftover")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    service.recover()
    assert young.exists() and not old.exists()
    with service.index.reading() as s:
        assert s.scalar(select(Blob.id)) is None
