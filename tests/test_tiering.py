"""Cold tiers on real data, in-process: objects moved when due, recompressed per instance or
as series volumes, verified, read back bit-exact from every form.

The archive service is the real one (SQLite index, archive folders, codecs); compression and
tier moves run in the calling thread (an executor that runs each job at once), so each test
decides what happens when. The node-level tests (getscu and Orthanc from the cold tier, a
kill -9 during `compacs tier run`) are in test_tiering_node.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, Future
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import dicomdata
import numpy as np
import pydicom
import pytest
from prometheus_client import REGISTRY

from compacs.service.archive_service import ArchiveService
from compacs.service.compress import source_frames
from compacs.service.config import load_config
from compacs.service.jobs import Jobs
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Index
from compacs.service.storage.schema import utcnow

COLD = """
[tiering]
stable_minutes = 0
cpu_share = 1
[[tiers]]
name = "cold"
after_days = 30
codecs = {codecs}
form = "{form}"
choose = "{choose}"
"""


class Inline(Executor):
    """Runs each submitted job at once, in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - what a worker would report
            future.set_exception(exc)
        return future


def make_service(
    tmp_path: Path,
    codecs: str = '["jpegxl", "hevc"]',
    form: str = "volume",
    choose: str = "smallest",
) -> ArchiveService:
    cfg = tmp_path / "compacs.toml"
    cfg.write_text(COLD.format(codecs=codecs, form=form, choose=choose))
    config = load_config(cfg, env={}, overrides={"data_dir": str(tmp_path / "data")})
    config.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index.open(config.effective_index_url, create=True)
    archive = Archive(config.data_dir / "archive")
    jobs = Jobs(config, archive, index, "test-node:1", executor_factory=Inline)
    return ArchiveService(config, archive, index, jobs)


@pytest.fixture
def services() -> Iterator[list[ArchiveService]]:
    opened: list[ArchiveService] = []
    yield opened
    for service in opened:
        service.close()


def receive(service: ArchiveService, paths: list[Path]) -> None:
    for path in paths:
        raw = path.read_bytes()
        ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
        assert service.receive(raw, "MODALITY", ds.SOPClassUID, ds.SOPInstanceUID) == 0


def later(days: int = 31):  # noqa: ANN201
    return utcnow() + timedelta(days=days)


def frames_by_sop(paths: list[Path]) -> dict[str, list[np.ndarray]]:
    out = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = [np.asarray(f) for f in source_frames(ds)]
    return out


def assert_read_back(service: ArchiveService, want: dict[str, list[np.ndarray]]) -> None:
    held = {inst.sop_instance_uid: inst for inst in service.index.instances()}
    for sop, frames in want.items():
        got = source_frames(pydicom.dcmread(BytesIO(service.read_instance(held[sop]))))
        assert len(got) == len(frames), sop
        for g, w in zip(got, frames, strict=True):
            assert np.array_equal(g, w), sop


def test_cold_tier_round_trips_every_form_bit_exact(tmp_path, services) -> None:
    """A CT series, an MR series, a multi-frame MR and a US cine: each moves to the cold tier
    in the smallest verified form, and reads back bit-exact."""
    service = make_service(tmp_path)
    services.append(service)
    ct = dicomdata.real_ct_series(tmp_path / "ct")
    mr = dicomdata.real_mr_series(tmp_path / "mr")
    multiframe = [dicomdata.fresh_copy("emri_small.dcm", tmp_path / "mf")]
    cine = [dicomdata.real_us_cine(tmp_path / "us", frames=16)]
    everything = ct + mr + multiframe + cine
    receive(service, everything)
    assert service.index.stats()["pending"] == 0
    assert service.tier_run(utcnow(), executor=Inline()).moved == 0  # nothing due yet
    report = service.tier_run(later(), executor=Inline())
    assert not report.failed and report.moved == len(everything)
    stats = service.index.stats()
    assert stats["by_tier"]["cold"]["instances"] == len(everything)
    assert "hot" not in stats["by_tier"]
    held = {inst.sop_instance_uid: inst for inst in service.index.instances()}
    cine_row = held[str(pydicom.dcmread(cine[0]).SOPInstanceUID)]
    assert cine_row.codec == "hevc"  # frames predicted from each other win on cine
    assert_read_back(service, frames_by_sop(everything))
    assert report.bytes_after < report.bytes_before
    # nothing is moved twice
    assert service.tier_run(later(), executor=Inline()).moved == 0


def test_a_series_volume_reads_one_slice_alone_and_takes_new_instances_on_their_own(
    tmp_path, services
) -> None:
    service = make_service(tmp_path, codecs='["hevc"]', choose="first")
    services.append(service)
    ct = dicomdata.real_ct_series(tmp_path / "ct")
    receive(service, ct)
    report = service.tier_run(later(), executor=Inline())
    assert report.series_packed == 1 and report.moved == 20
    held = {inst.sop_instance_uid: inst for inst in service.index.instances()}
    middle = pydicom.dcmread(ct[10])
    inst = held[str(middle.SOPInstanceUID)]
    assert inst.blob.kind == "volume" and inst.frame_first is not None
    assert len({i.blob_pk for i in held.values()}) == 1  # one blob holds the series
    service.volumes = type(service.volumes)()  # an empty cache: count what one read decodes
    got = pydicom.dcmread(BytesIO(service.read_instance(inst)))
    assert np.array_equal(source_frames(got)[0], source_frames(middle)[0])
    (frames,) = service.volumes._cache.values()  # one group decoded, at most gop_size frames
    assert len(frames) <= 16

    # a slice that arrives after the series was packed: stored, then moved on its own
    late = dicomdata.fresh_copy(
        ct[0], tmp_path / "late", StudyInstanceUID=middle.StudyInstanceUID,
        SeriesInstanceUID=middle.SeriesInstanceUID, InstanceNumber=21,
    )  # fmt: skip
    receive(service, [late])
    versions = {i.sop_instance_uid: i.version for i in service.index.instances()}
    report = service.tier_run(later(), executor=Inline())
    assert report.moved == 1 and report.series_packed == 0
    after = {i.sop_instance_uid: i for i in service.index.instances()}
    late_row = after[str(pydicom.dcmread(late).SOPInstanceUID)]
    assert late_row.blob.tier == "cold" and late_row.frame_first is None
    for sop, version in versions.items():
        if sop != late_row.sop_instance_uid:
            assert after[sop].version == version  # the packed slices are untouched
    assert_read_back(service, frames_by_sop([*ct, late]))


def test_hevc_that_fails_verification_falls_back_to_the_next_codec(
    tmp_path, services, monkeypatch, caplog
) -> None:
    """x265 codes 64-wide frames wrong (codecs/hevc.py pads them for that reason): with the
    padding taken away, the verification refuses HEVC and the tier takes JPEG-XL."""
    from compacs.codecs import hevc

    monkeypatch.setattr(hevc, "coded_size", lambda rows, columns: (rows, columns))
    service = make_service(tmp_path, codecs='["hevc", "jpegxl"]', choose="first")
    services.append(service)
    multiframe = [dicomdata.fresh_copy("emri_small.dcm", tmp_path / "mf")]  # 64 x 64 frames
    receive(service, multiframe)
    with caplog.at_level("INFO", logger="compacs.tiering"):
        report = service.tier_run(later(), executor=Inline())
    (inst,) = service.index.instances()
    if inst.codec == "hevc":
        pytest.skip("x265 coded the 64-wide frames right on this machine")
    # JPEG-XL verified, but is no smaller than the stored JPEG-LS here: moved as stored
    assert report.moved == 1 and inst.codec in ("jpegxl", "jpegls") and inst.blob.tier == "cold"
    assert "hevc failed: VolumeMismatch" in caplog.text
    assert_read_back(service, frames_by_sop(multiframe))


def test_the_replaced_hot_blobs_are_swept_and_nothing_is_orphaned(tmp_path, services) -> None:
    import dataclasses

    service = make_service(tmp_path, codecs='["jpegxl"]', form="instance")
    services.append(service)
    files = dicomdata.real_ct_series(tmp_path / "ct")[:3]
    receive(service, files)
    service.tier_run(later(), executor=Inline())
    service.config.storage = dataclasses.replace(service.config.storage, delete_grace_seconds=0)
    service.sweep()
    on_disk = {p for archive in service.archives.values() for p in archive.blobs()}
    assert on_disk == service.index.blob_paths()
    assert all(p.startswith("cold/") for p in on_disk)


def test_fixity_checks_every_blob_and_reports_a_damaged_one(tmp_path, services) -> None:
    service = make_service(tmp_path, codecs='["hevc"]', choose="first")
    services.append(service)
    receive(service, dicomdata.real_ct_series(tmp_path / "ct")[:4])
    service.tier_run(later(), executor=Inline())
    report = service.fixity_run()
    assert report.checked >= 1 and not report.failed
    (volume,) = {i.blob.path for i in service.index.instances()}
    path = service.archive_for("cold").abspath(volume)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with service.index.writing() as s:  # due again
        from sqlalchemy import update

        from compacs.service.storage.index import Blob

        s.execute(update(Blob).values(verified_at=None))
    failures = REGISTRY.get_sample_value("compacs_fixity_failures_total")
    report = service.fixity_run()
    assert len(report.failed) == 1 and "checksum mismatch" in report.failed[0]
    assert REGISTRY.get_sample_value("compacs_fixity_failures_total") == failures + 1
    assert service.index.fixity_failures()


def test_the_scheduler_starts_while_ingest_writes_the_index(tmp_path, services) -> None:
    """`compacs serve` starts its scheduler after it listens, so ingest may be writing the
    SQLite index meanwhile. The job store checks for its table and creates it: in a deferred
    transaction, a writer's commit in between makes that CREATE fail at once with "database is
    locked" (WAL: a stale read snapshot cannot become a writer), which stopped the node at
    start. Here a writer holds the index for a second and commits while the scheduler waits."""
    import sqlite3
    import threading

    from sqlalchemy import inspect

    service = make_service(tmp_path)
    services.append(service)
    writer = sqlite3.connect(
        tmp_path / "data" / "index.sqlite", isolation_level=None, check_same_thread=False
    )
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE ingest_stand_in (x INTEGER)")
    commit = threading.Timer(1.0, lambda: writer.execute("COMMIT"))
    commit.start()
    try:
        service.start_scheduler()
    finally:
        commit.join()
        writer.close()
    tables = inspect(service.index.engine).get_table_names()
    assert any(t.startswith("apscheduler_") for t in tables), tables
    assert {job.id for job in service._scheduler.get_jobs()} >= {"tier-run"}
