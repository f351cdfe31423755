"""Several processes on one index and archive root, and readers racing writers.

- Two `compacs serve` processes on one PostgreSQL index and one archive root, on two ports:
  4 storescu associations split across them, 400 instances; one is killed with SIGKILL in
  the middle. The other takes over its pending work once the dead one's lease runs out;
  every acknowledged instance exports bit-exact, no row is there twice, and after the dead
  one's restart (which removes what it left half-written) verify is clean.
- A C-MOVE of a study whose compression is still running: every blob is replaced while the
  sub-operations read them, and every sub-operation completes.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, wait_compressed
from test_bulk_jobs import paused, workers
from test_durability import freeze_after, start_storescu, successes, thaw

SHARED = """
[ingest]
lease_seconds = 3
retry_seconds = 0.5
[storage]
delete_grace_seconds = 2
"""


def test_two_nodes_share_one_postgresql_index_and_archive(
    pg_url: str, make_node, tmp_path: Path
) -> None:  # pg_url first: its database is dropped after the nodes have stopped
    data = tmp_path / "shared"
    env = {"COMPACS_INDEX_URL": pg_url}
    a = make_node(SHARED, env, data_dir=data, log_path=tmp_path / "node-a.log")
    b = make_node(SHARED, env, data_dir=data, log_path=tmp_path / "node-b.log")
    groups = [dicomdata.ct_series(tmp_path / f"ct{i}", 100, prefix=f"g{i}") for i in range(4)]
    logs = [tmp_path / f"storescu{i}.log" for i in range(4)]
    senders = [
        start_storescu(node, files, log)
        for node, files, log in zip((a, a, b, b), groups, logs, strict=True)
    ]
    try:
        freeze_after(senders[2:], logs[2:], 60)  # b's senders held with files left
        assert all(sender.poll() is None for sender in senders[2:])
        b.kill9()  # the node and its workers, mid-run
    finally:
        thaw(senders[2:])
    for sender in senders:
        sender.wait(timeout=300)
    acknowledged = [path for log in logs for path in successes(log)]
    assert len(acknowledged) >= 260, len(acknowledged)

    # the survivor finishes the dead node's pending objects once their lease has run out
    stats = wait_compressed(a, len(acknowledged), timeout=300, env=env)
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in acknowledged]
    assert stats["instances"] >= len(acknowledged)
    assert stats["by_codec"]["jpegls"]["instances"] == stats["instances"]
    out = tmp_path / "out"
    res = a.cli("export", "--data", str(data), "--all", "--out", str(out), env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    exported = exported_by_sop(out)
    # one row, one file per instance: nothing received twice by the two nodes
    assert len(list(out.rglob("*.dcm"))) == len(exported) == stats["instances"]
    pixels = dicomdata.ct_slice_pixels()
    for sop in sops:
        assert np.array_equal(pydicom.dcmread(exported[sop]).pixel_array, pixels), sop
    assert "Traceback" not in a.log_text()

    b.start()  # its recovery removes what it left half-written when it was killed
    deadline = time.monotonic() + 120
    while True:
        verify = a.cli("verify", "--data", str(data), env=env)
        if verify.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)  # released blobs wait for the sweep's grace period
    assert verify.returncode == 0, verify.stdout[-3000:]


@pytest.mark.parametrize("grace", [60, 0], ids=["blobs-kept-for-readers", "blobs-swept-at-once"])
def test_cmove_of_a_study_being_compressed_completes_every_suboperation(
    make_node, make_storescp, tmp_path: Path, grace: int
) -> None:
    """The C-MOVE reads its 60 rows while all are pending; compression resumes once the first
    sub-operations are through, and swaps every blob under the move. With a grace period the
    received blobs are still there to read; with none (swept within half a second) a read
    that finds its blob gone reads the row again and sends the compressed one."""
    dest = make_storescp()
    node = make_node(
        f'[move_destinations]\n{dest.aet} = "127.0.0.1:{dest.port}"\n'
        f"[storage]\ndelete_grace_seconds = {grace}\n[ingest]\nlease_seconds = 1\n"
    )
    files = dicomdata.ct_series(tmp_path / "ct", 60)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    with paused(workers(node)):
        assert peers.store_ok(node.store(files), files)  # all pending, compression held
        assert node.stats()["pending"] == 60
        mover = subprocess.Popen(
            [
                "movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", node.ae_title,
                "-aem", dest.aet, "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", node.host, str(node.port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=peers.dcmtk_env(),
        )  # fmt: skip
        deadline = time.monotonic() + 120  # a deadline, not a measure
        while len(dest.received()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    out, _ = mover.communicate(timeout=300)  # compression runs while the move goes on
    # Success, not Warning (0xB000): no sub-operation failed
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    assert "Received Move Response 60 (Pending)" in out
    assert wait_compressed(node, 60)["by_codec"]["jpegls"]["instances"] == 60
    received = dest.received()
    assert len(received) == 60
    pixels = dicomdata.ct_slice_pixels()
    for path in received:
        assert np.array_equal(pydicom.dcmread(path).pixel_array, pixels)
