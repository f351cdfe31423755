"""Crash isolation and what an administrator does about problem objects, on a real node.

A codec that kills its worker (tests/crash_plugin: a real codec whose encoder ends its
process, registered in the node and its spawned workers) is given one marked object while
several innocent ones wait in the same pool: only the culprit is charged and parked, every
innocent one is compressed. `compacs problems` lists it, `compacs problems ack` lets
`compacs verify` pass, `compacs requeue` sends it back. A corrupt JPEG-LS arrival (a real
JPEG-LS file from DCMTK's dcmcjpls, its scan damaged) is acknowledged, flagged when its job
first meets it, listed, and goes out as stored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dicomdata
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, wait_compressed
from sqlalchemy import func, select, update
from test_bulk_jobs import paused, workers
from test_jobs import make_service, receive

from compacs.service.maintenance import verify
from compacs.service.storage.index import Index, Instance
from compacs.service.storage.schema import Acknowledgement

CRASH_PLUGIN = Path(__file__).parent / "crash_plugin"
CRASH_CONFIG = """
[node]
workers = 2
[ingest]
retry_seconds = 0.3
max_attempts = 3
lease_seconds = 4
[[rules]]
name = "marked"
match = { CallingAETitle = "CRASHER" }
codecs = ["crashtest"]
[[rules]]
name = "held"
match = { CallingAETitle = "HOLDER" }
codecs = ["holdtest"]
[[rules]]
name = "everything else"
codecs = ["jpegls"]
"""
JPEG_LS = "1.2.840.10008.1.2.4.80"


def attempts(node: peers.CompacsProcess) -> dict[str, tuple[str, int, str | None]]:
    """SOP Instance UID -> (state, attempts, codec), read from the node's index."""
    index = Index.open(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    try:
        with index.reading() as s:
            rows = s.execute(
                select(Instance.sop_instance_uid, Instance.state, Instance.attempts, Instance.codec)
            )
            return {sop: (state, n, codec) for sop, state, n, codec in rows}
    finally:
        index.close()


def problems_json(node: peers.CompacsProcess) -> list[dict]:
    res = node.cli("problems", "--data", str(node.data_dir), "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert listed["fixity_failures"] == []
    return listed["objects"]


def wait_for(what, timeout: float = 120):  # noqa: ANN001, ANN201
    """Poll until `what()` is true; a deadline so a broken node fails instead of hanging."""
    deadline = time.monotonic() + timeout
    while not (result := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)
    return result


@pytest.fixture
def crash_node(make_node, tmp_path: Path):  # noqa: ANN001, ANN201
    path = os.pathsep.join(filter(None, [str(CRASH_PLUGIN), os.environ.get("PYTHONPATH")]))
    release = tmp_path / "release-held-job"
    return make_node(CRASH_CONFIG, env={"PYTHONPATH": path, "CRASHTEST_RELEASE": str(release)})


def test_only_the_object_that_crashes_its_worker_is_charged_and_parked(
    crash_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    node = crash_node
    held = dicomdata.ct_series(tmp_path / "held", 1)  # innocent, running beside the culprit
    culprit = dicomdata.ct_series(tmp_path / "culprit", 1)
    innocent = dicomdata.ct_series(tmp_path / "innocent", 5)
    held_uid, culprit_uid = (
        str(pydicom.dcmread(f[0], stop_before_pixels=True).SOPInstanceUID) for f in (held, culprit)
    )
    procs = workers(node)
    assert len(procs) == 2, procs
    with paused(procs):  # every job waits in the pool: the crash takes them all with it
        assert peers.store_ok(node.store(held, aet="HOLDER"), held)
        assert peers.store_ok(node.store(culprit, aet="CRASHER"), culprit)
        assert peers.store_ok(node.store(innocent), innocent)
    # one worker holds the held job, the other takes the culprit and dies
    wait_for(lambda: "a compression worker died" in node.log_text())
    (tmp_path / "release-held-job").touch()
    stats = wait_compressed(node, 7, timeout=300)
    assert stats["parked"] == 1, stats
    assert stats["by_codec"]["jpegls"]["instances"] == 5, stats
    assert stats["by_codec"]["holdtest"]["instances"] == 1, stats
    rows = attempts(node)
    assert rows.pop(culprit_uid) == ("parked", 3, None)
    assert rows.pop(held_uid) == ("stored", 0, "holdtest")
    assert set(rows.values()) == {("stored", 0, "jpegls")}, rows  # no innocent was charged
    log = node.log_text()
    assert "a compression worker died: starting a new worker pool" in log
    assert log.count(f"SOP {culprit_uid} kills the compression worker") == 3, node.log_tail()
    assert "failed 3 times, parked" in log
    # the held job, cut off with the pool, ran alone before the culprit (in arrival order)
    assert (
        log.index("a compression worker died")
        < log.index(f"stored SOP {held_uid}")
        < log.index(f"SOP {culprit_uid} kills the compression worker")
    )

    listed = node.cli("problems", "--data", str(node.data_dir))
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith(culprit_uid)]
    assert "parked" in line and "the compression worker died running this object alone" in line
    summary = "1 problem(s): 1 parked, 0 flagged, 0 patient-ID conflict(s), 0 acknowledged"
    assert summary in listed.stdout, listed.stdout
    verify = node.verify()
    assert verify.returncode == 1 and f"SOP {culprit_uid}" in verify.stdout, verify.stdout

    # acknowledged: verify passes, and says so
    bad = node.cli("problems", "ack", "--data", str(node.data_dir), "1.2.3.4")
    assert bad.returncode == 2 and "no flagged or parked object has" in bad.stderr, bad.stderr
    ack = node.cli(
        "problems", "ack", "--data", str(node.data_dir), culprit_uid,
        "--by", "dr admin", "--note", "the crashtest codec",
    )  # fmt: skip
    assert ack.returncode == 0, ack.stderr
    (problem,) = problems_json(node)
    assert problem["acknowledged"]["by"] == "dr admin"
    assert problem["acknowledged"]["note"] == "the crashtest codec"
    verify = node.verify()
    assert verify.returncode == 0, verify.stdout
    assert "0 problem(s), 1 acknowledged" in verify.stdout

    # re-queued: tried again from no attempts (and parked again: the codec still crashes),
    # and the acknowledgement ended with the old problem
    requeue = node.cli("requeue", "--data", str(node.data_dir), culprit_uid)
    assert requeue.returncode == 0, requeue.stderr
    assert "1 parked object(s) re-queued" in requeue.stdout
    assert attempts(node)[culprit_uid][:2] == ("pending", 0)
    wait_for(lambda: node.log_text().count(f"SOP {culprit_uid} kills the compression") == 6)
    wait_for(lambda: attempts(node)[culprit_uid] == ("parked", 3, None))
    (problem,) = problems_json(node)
    assert problem["acknowledged"] is None
    assert node.verify().returncode == 1
    assert node.cli("requeue", "--data", str(node.data_dir), "--all").returncode == 0
    assert attempts(node)[culprit_uid][:2] == ("pending", 0)


TIER_CONFIG = """
[ingest]
lease_seconds = 2
[tiering]
stable_minutes = 0
cpu_share = 1
every_minutes = 0
[[tiers]]
name = "cold"
after_days = 30
codecs = ["crashmarked"]
form = "instance"
"""


def test_a_tier_move_that_kills_its_worker_fails_alone(make_node, tmp_path: Path) -> None:
    """The tier worker runs one move at a time: the move that kills it fails, and the moves
    after it get a fresh worker instead of a broken pool."""
    path = os.pathsep.join(filter(None, [str(CRASH_PLUGIN), os.environ.get("PYTHONPATH")]))
    node = make_node(TIER_CONFIG, env={"PYTHONPATH": path})
    (marked,) = dicomdata.ct_series(tmp_path / "marked", 1)
    ds = pydicom.dcmread(marked)
    pixels = ds.pixel_array.copy()
    pixels[0, :2] = (4242, -4242)  # what crashmarked dies on
    ds.PixelData = pixels.tobytes()
    ds.save_as(marked)
    others = dicomdata.ct_series(tmp_path / "others", 4)
    assert peers.store_ok(node.store([marked]), [marked])  # first: moved first
    assert peers.store_ok(node.store(others), others)
    wait_compressed(node, 5)
    res = node.cli(
        "tier", "run", "--config", str(node.config), "--data", str(node.data_dir),
        "--as-of", "2099-01-01",
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    (failed,) = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert ds.SOPInstanceUID in failed and "BrokenProcessPool" in failed, res.stdout
    tiers = node.stats()["by_tier"]
    assert tiers["cold"]["instances"] == 4 and tiers["hot"]["instances"] == 1, tiers


def corrupt_jpegls(tmp_path: Path) -> tuple[Path, Path]:
    """Two real JPEG-LS files from a CT slice each (DCMTK dcmcjpls): one intact, one with
    64 bytes in the middle of its scan overwritten (CharLS: "invalid JPEG-LS stream")."""
    out = []
    for name in ("good", "bad"):
        (src,) = dicomdata.ct_series(tmp_path / f"ct-{name}", 1)
        dst = tmp_path / f"{name}-jpegls.dcm"
        res = peers.run_dcmtk("dcmcjpls", str(src), str(dst))
        assert res.returncode == 0, res.stdout
        out.append(dst)
    data = bytearray(out[1].read_bytes())
    start, end = data.find(b"\xff\xd8\xff\xf7"), data.rfind(b"\xff\xd9")
    middle = (start + end) // 2
    data[middle : middle + 64] = b"\xff" * 64
    out[1].write_bytes(bytes(data))
    return out[0], out[1]


def test_a_corrupt_jpegls_arrival_is_kept_flagged_listed_and_sent_as_stored(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    node = compacs_node
    good, bad = corrupt_jpegls(tmp_path)
    assert peers.transfer_syntax_of(bad) == JPEG_LS
    bad_uid = str(pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID)
    res = node.store([good, bad])
    assert peers.store_ok(res, [good, bad]), res.stdout  # acknowledged, never refused
    stats = wait_compressed(node, 2)
    assert stats["flagged"] == 1 and stats["parked"] == 0, stats
    rows = attempts(node)
    assert rows[bad_uid] == ("stored", 0, "passthrough")  # not a failed attempt
    (problem,) = problems_json(node)
    assert problem["sop_instance_uid"] == bad_uid and problem["state"] == "stored"
    assert problem["defects"].startswith("pixel data does not decode: JpeglsError"), problem
    assert "\n" not in problem["defects"]
    assert f"SOP {bad_uid}: pixel data does not decode" in node.log_text()

    verify = node.verify()
    assert verify.returncode == 1 and f"SOP {bad_uid}" in verify.stdout
    assert verify.stdout.count(bad_uid) == 1, verify.stdout  # the flag, not also its decoding
    requeue = node.cli("requeue", "--data", str(node.data_dir), bad_uid)  # flagged, not parked
    assert requeue.returncode == 2 and "no parked object has SOP Instance UID" in requeue.stderr
    requeue = node.cli("requeue", "--data", str(node.data_dir))
    assert requeue.returncode == 2, requeue.stderr
    assert "compacs: requeue: give SOP Instance UIDs, --study UID, or --all" in requeue.stderr
    ack = node.cli("problems", "ack", "--data", str(node.data_dir), bad_uid)
    assert ack.returncode == 0, ack.stderr
    assert node.verify().returncode == 0

    sent = pydicom.dcmread(bad)
    out = tmp_path / "as-stored"
    assert node.export(out, transfer_syntax="stored").returncode == 0
    exported = pydicom.dcmread(exported_by_sop(out)[bad_uid])
    assert exported.file_meta.TransferSyntaxUID == JPEG_LS
    assert exported.PixelData == sent.PixelData
    got = tmp_path / "got"
    res = peers.getscu(
        node.port, "IMAGE", {"StudyInstanceUID": sent.StudyInstanceUID,
        "SeriesInstanceUID": sent.SeriesInstanceUID, "SOPInstanceUID": bad_uid},
        got, extra=["+xt"],
    )  # fmt: skip
    (retrieved,) = got.glob("*")
    retrieved_ds = pydicom.dcmread(retrieved)
    assert retrieved_ds.file_meta.TransferSyntaxUID == JPEG_LS, res.stdout
    assert retrieved_ds.PixelData == sent.PixelData

    # a damaged blob is no flag to acknowledge: verify fails until it is restored; fixity
    # re-reads both blobs and fails only that one (the flagged one is intact as received)
    good_uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    blob = next(
        p for p in (node.data_dir / "archive" / "hot").rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == good_uid
    )  # fmt: skip
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    fixity = node.cli("tier", "fixity", "--data", str(node.data_dir))
    assert fixity.returncode == 1, fixity.stdout + fixity.stderr
    listed = json.loads(node.cli("problems", "--data", str(node.data_dir), "--json").stdout)
    (failure,) = listed["fixity_failures"]
    assert "checksum mismatch" in failure["error"] and failure["blob"] in str(blob), failure
    assert node.cli("problems", "ack", "--data", str(node.data_dir), "--all").returncode == 0
    verify = node.verify()
    assert verify.returncode == 1 and "checksum mismatch" in verify.stdout, verify.stdout


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_park_acknowledge_and_requeue_in_the_index(database: str, request, tmp_path: Path) -> None:
    """The index side of problems, ack and requeue on both databases, in-process: a job that
    always fails (its received blob damaged on disk) is parked; acknowledged; a changed
    problem is not; requeued, it is pending from no attempts, unclaimed, its version moved
    on, its acknowledgement gone; a flag the job adds keeps the defects ingest found."""
    from compacs.service import problems

    url = request.getfixturevalue("pg_url") if database == "postgresql" else ""
    service, steps = make_service(tmp_path, f'max_attempts = 2\n[node]\nindex_url = "{url}"\n')
    try:
        (ct,) = dicomdata.ct_series(tmp_path / "ct", 1)
        assert receive(service, ct.read_bytes()) == 0
        (inst,) = service.index.instances()
        path = service.archive.abspath(inst.blob.path)
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        steps.run_one()
        steps.run_one()
        index = service.index
        (problem,) = index.problems()
        assert (problem.state, problem.attempts, problem.acknowledged) == ("parked", 2, None)
        assert problem.text.startswith("parked: ") and "checksum mismatch" in problem.text
        with pytest.raises(problems.SelectionError, match="no flagged or parked object"):
            problems.acknowledge(index, ["1.2.3"], [], False, "me", None)
        acked = problems.acknowledge(index, [], [problem.study_instance_uid], False, "me", "n")
        assert [p.sop_instance_uid for p in acked] == [problem.sop_instance_uid]
        (problem,) = index.problems()
        assert (problem.acknowledged.by, problem.acknowledged.note) == ("me", "n")
        with index.writing() as s:  # the problem changes: the acknowledgement no longer holds
            s.execute(update(Instance).values(last_error="another error"))
        assert index.problems()[0].acknowledged is None
        assert problems.requeue(index, [], [], True, "me") == 1
        (row,) = index.instances()
        assert (row.state, row.attempts, row.last_error, row.claimed_by) == (
            "pending", 0, None, None,
        )  # fmt: skip
        assert row.version == inst.version + 1
        assert index.problems() == []
        with index.writing() as s:  # what the acknowledgement table holds: nothing for it
            assert s.scalar(select(func.count()).select_from(Acknowledgement)) == 0
    finally:
        service.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_jobs_flag_joins_the_defects_ingest_found(database: str, request, tmp_path: Path):
    """A corrupt JPEG-LS arrival with a study UID ingest flags (a hex letter): both flags are
    kept, in one line each, and the object stays as received, without a failed attempt. On
    an index from before arrivals were decoded, verify flags it."""
    url = request.getfixturevalue("pg_url") if database == "postgresql" else ""
    service, steps = make_service(tmp_path, f'[node]\nindex_url = "{url}"\n')
    try:
        _good, bad = corrupt_jpegls(tmp_path)
        ds = pydicom.dcmread(bad)
        ds.StudyInstanceUID = "1.2.3.4a"
        ds.save_as(bad)
        assert receive(service, bad.read_bytes()) == 0
        steps.run_one()
        (problem,) = service.index.problems()
        assert problem.state == "stored" and problem.attempts == 0
        first, second = problem.defects.split("; ")
        assert first == "StudyInstanceUID '1.2.3.4a' is not a valid UID"
        assert second.startswith("pixel data does not decode: JpeglsError")
        (inst,) = service.index.instances()
        assert service.read_instance(inst) == bad.read_bytes()  # kept as received

        # an index from before arrivals were decoded: verify flags what it finds
        with service.index.writing() as s:
            s.execute(update(Instance).values(defects=None))
        (line,) = [f for f in verify(service, progress=False) if ds.SOPInstanceUID in f]
        assert "flagged: pixel data does not decode: JpeglsError" in line, line
        (problem,) = service.index.problems()
        assert problem.defects.startswith("pixel data does not decode: JpeglsError")
    finally:
        service.close()
