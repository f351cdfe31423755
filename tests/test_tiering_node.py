"""Cold tiers on a running node: `compacs tier run`, retrieval from the cold tier by getscu
and by Orthanc, a kill -9 in the middle of a tier run, `compacs tier status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
from nodecheck import exported_by_sop, store_all, wait_compressed
from test_retrieve import orthanc_pixels

COLD = """
[ingest]
lease_seconds = 2
[tiering]
stable_minutes = 0
cpu_share = 1
every_minutes = 0
[[tiers]]
name = "cold"
after_days = 30
codecs = ["jpegxl", "hevc"]
form = "volume"
choose = "smallest"
"""
AS_OF = "2099-01-01"  # everything is due


def tier_run(node: peers.CompacsProcess) -> subprocess.CompletedProcess[str]:
    return node.cli(
        "tier", "run", "--config", str(node.config), "--data", str(node.data_dir), "--as-of", AS_OF
    )


def test_getscu_and_orthanc_retrieve_from_the_cold_tier(make_node, make_orthanc, tmp_path) -> None:
    orthanc = make_orthanc()
    node = make_node(COLD + f'[move_destinations]\nORTHANC = "127.0.0.1:{orthanc.dicom_port}"\n')
    ct = dicomdata.real_ct_series(tmp_path / "ct")
    cine = dicomdata.real_us_cine(tmp_path / "us", frames=12)
    store_all(node, [*ct, cine])
    wait_compressed(node, len(ct) + 1)
    res = tier_run(node)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "21 instance(s) moved" in res.stdout
    status = json.loads(
        node.cli(
            "tier", "status", "--config", str(node.config), "--data", str(node.data_dir), "--json"
        ).stdout
    )
    assert status["tiers"]["cold"]["instances"] == 21 and "hot" not in status["tiers"]

    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    out = tmp_path / "get"
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    for path in ct:
        src = pydicom.dcmread(path)
        assert np.array_equal(pydicom.dcmread(got[src.SOPInstanceUID]).pixel_array, src.pixel_array)

    orthanc.put_modality("compacs", node.ae_title, "127.0.0.1", node.port)
    src = pydicom.dcmread(cine)
    orthanc.move_from_modality("compacs", "Study", [{"StudyInstanceUID": src.StudyInstanceUID}])
    instance_id = orthanc.find_instance(src.SOPInstanceUID)
    assert instance_id is not None
    copy = tmp_path / "from-orthanc.dcm"
    copy.write_bytes(orthanc.instance_file(instance_id))
    assert np.array_equal(dicomdata.read_pixels(copy), src.pixel_array)
    middle = pydicom.dcmread(ct[10])
    orthanc.move_from_modality(
        "compacs", "Instance",
        [{"StudyInstanceUID": study, "SeriesInstanceUID": middle.SeriesInstanceUID,
          "SOPInstanceUID": middle.SOPInstanceUID}],
    )  # fmt: skip
    slice_id = orthanc.find_instance(middle.SOPInstanceUID)
    pixels = orthanc_pixels(orthanc, slice_id, signed=False).reshape(middle.pixel_array.shape)
    assert np.array_equal(pixels, middle.pixel_array)  # Orthanc's own decoder


def test_kill_9_during_a_tier_run_loses_nothing_and_the_next_run_finishes(
    make_node, tmp_path
) -> None:
    node = make_node(COLD)
    ct = dicomdata.real_ct_series(tmp_path / "ct")
    mr = dicomdata.real_mr_series(tmp_path / "mr")
    multiframe = dicomdata.fresh_copy("emri_small.dcm", tmp_path / "mf")
    files = [*ct, *mr, multiframe]
    store_all(node, files)
    wait_compressed(node, len(files))
    cold = Path(node.data_dir) / "tiers" / "cold"
    args = [
        "tier",
        "run",
        "--config",
        str(node.config),
        "--data",
        str(node.data_dir),
        "--as-of",
        AS_OF,
    ]
    runner = subprocess.Popen(
        [sys.executable, "-m", "compacs.service.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its worker too, killed with it
        env={k: v for k, v in os.environ.items() if not k.startswith("COMPACS_")},
    )
    deadline = time.monotonic() + 120  # a deadline, not a measure
    while not list(cold.rglob("*.dcm")) and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(runner.pid, signal.SIGKILL)  # mid-run: a move written, others not
    runner.wait()
    midway = node.stats()["by_tier"]
    assert midway.get("hot", {}).get("instances", 0) > 0, midway  # it was killed mid-run
    time.sleep(2.5)  # past the lease: what it claimed and wrote counts as a dead writer's

    res = tier_run(node)  # the restart: removes the half-done, finishes the rest
    assert res.returncode == 0, res.stdout + res.stderr
    stats = node.stats()
    assert stats["by_tier"]["cold"]["instances"] == len(files) and stats["pending"] == 0
    out = tmp_path / "out"
    conf = ["--config", str(node.config), "--data", str(node.data_dir)]
    res = node.cli("export", *conf, "--all", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:]
    exported = exported_by_sop(out)
    for path in files:
        src = pydicom.dcmread(path)
        assert np.array_equal(
            pydicom.dcmread(exported[src.SOPInstanceUID]).pixel_array, src.pixel_array
        )
    verify = node.cli("verify", *conf)  # no orphan: the killed run's half-done files are gone
    assert verify.returncode == 0, verify.stdout[-3000:]


def test_the_node_schedules_tier_runs_with_its_job_store_in_the_index(make_node, tmp_path) -> None:
    """APScheduler in `compacs serve`: the due objects move without an operator, and the job
    is kept in the index across a restart (one row, not one per start)."""
    from sqlalchemy import create_engine, inspect, text

    config = COLD.replace("every_minutes = 0", "every_minutes = 0.05").replace(
        "after_days = 30", "after_days = 0"
    )
    node = make_node(config)
    files = dicomdata.ct_series(tmp_path / "ct", 3)
    store_all(node, files)
    deadline = time.monotonic() + 120  # a deadline, not a measure
    while node.stats()["by_tier"].get("cold", {}).get("instances", 0) < 3:
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(0.5)
    assert "scheduled: tier-run every 0.05 min" in node.log_text()
    node.stop()
    node.start()
    engine = create_engine(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    try:
        (table,) = [t for t in inspect(engine).get_table_names() if t.startswith("apscheduler_")]
        with engine.connect() as conn:
            jobs = sorted(r[0] for r in conn.execute(text(f"SELECT id FROM {table}")))
    finally:
        engine.dispose()
    assert jobs == ["fixity", "tier-run"]
