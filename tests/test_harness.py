"""Tests of the test harness itself: real peers start, talk and stop; test data is sound.

They need no compacs code, so they pass while the service is being written, and they
tell a broken harness apart from a broken service.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest

EXPECTED_TS = {
    "ct": "1.2.840.10008.1.2.1",
    "jpeg_ls": "1.2.840.10008.1.2.4.80",
    "j2k": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_lossy": "1.2.840.10008.1.2.4.50",
    "implicit": "1.2.840.10008.1.2",
    "signed12": "1.2.840.10008.1.2.1",
}


# ---------------------------------------------------------------- process helpers


def test_free_port_distinct_and_bindable() -> None:
    ports = {peers.free_port() for _ in range(20)}
    assert len(ports) == 20
    assert all(not peers.port_open(peers.LOOPBACK, p) for p in ports)


def test_wait_for_port_reports_early_exit(tmp_path: Path) -> None:
    log = tmp_path / "boom.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    with pytest.raises(peers.PeerError, match="boom: bad config"):
        peers.wait_for_port(peers.LOOPBACK, peers.free_port(), 60, proc, log)
    assert proc.returncode == 3


def test_compacs_start_failure_carries_log(tmp_path: Path) -> None:
    """A node that cannot start raises at once with its log, and leaves no process."""
    node = peers.CompacsProcess(tmp_path / "data", extra_args=["--no-such-option-xyz"])
    with pytest.raises(peers.PeerError) as info:
        node.start()
    assert node.log_text().strip().splitlines()[-1] in str(info.value)
    assert not node.running
    assert not peers.pid_alive(node.pid)


class _HttpServer(peers.ManagedProcess):
    """Stand-in server with the lifecycle CompacsProcess relies on."""

    name = "http.server"

    def __init__(self, root: Path) -> None:
        super().__init__(root / "http.log", start_timeout=30)
        self.port = peers.free_port()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "http.server", str(self.port), "--bind", peers.LOOPBACK]


def test_process_lifecycle_kill9_and_restart_same_port(tmp_path: Path) -> None:
    srv = _HttpServer(tmp_path).start()
    first = srv.pid
    assert peers.port_open(peers.LOOPBACK, srv.port)
    srv.kill9()
    assert not peers.pid_alive(first)
    srv.start()  # same port, right after SIGKILL
    assert srv.pid != first and srv.running
    assert srv.stop() == -15
    assert not peers.pid_alive(srv.pid)
    assert srv.log_text().count("=== ") == 2  # one header per start, log appended


def test_reap_stale_pids_kills_recorded_process() -> None:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        peers._record_pid(proc.pid)
        assert proc.pid in peers.reap_stale_pids()
        assert proc.wait(30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parse_storescu_log() -> None:
    log = """I: Sending file: /a.dcm
I: Sending Store Request (MsgID 1, CT)
I: Received Store Response (Success)
I: Sending file: /b.dcm
E: Store Failed, file: /b.dcm:
E: 0006:020e DIMSE Failed to send message
I: Sending file: /c.dcm
I: Received Store Response (Warning: Coercion of Data Elements)
"""
    assert peers.parse_storescu_log(log) == {
        "/a.dcm": "Success",
        "/b.dcm": "Failed: 0006:020e DIMSE Failed to send message",
        "/c.dcm": "Warning: Coercion of Data Elements",
    }


# ---------------------------------------------------------------- test data


def test_ct_series_distinct_uids(tmp_path: Path) -> None:
    files = dicomdata.ct_series(tmp_path, 5)
    dss = [pydicom.dcmread(f) for f in files]
    assert len({ds.SOPInstanceUID for ds in dss}) == 5
    assert len({ds.StudyInstanceUID for ds in dss}) == 1
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert [int(ds.InstanceNumber) for ds in dss] == [1, 2, 3, 4, 5]
    for ds in dss:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert np.array_equal(ds.pixel_array, dicomdata.ct_slice_pixels())
    # a second batch is a different study unless asked otherwise
    again = dicomdata.ct_series(tmp_path, 2, study_uid=dss[0].StudyInstanceUID)
    ds2 = pydicom.dcmread(again[0])
    assert ds2.StudyInstanceUID == dss[0].StudyInstanceUID
    assert ds2.SeriesInstanceUID != dss[0].SeriesInstanceUID
    assert len(list(tmp_path.iterdir())) == 7


def test_fresh_copy_keeps_syntax_and_pixels(tmp_path: Path) -> None:
    src = dicomdata.testdata_path("emri_small_RLE.dcm")
    a = dicomdata.fresh_copy(src, tmp_path)
    b = dicomdata.fresh_copy("emri_small_RLE.dcm", tmp_path, PatientID="P-B")
    orig, da, db = (pydicom.dcmread(p) for p in (src, a, b))
    assert da.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
    assert da.PixelData == orig.PixelData
    assert db.PatientID == "P-B"
    uids = {orig.SOPInstanceUID, da.SOPInstanceUID, db.SOPInstanceUID}
    assert len(uids) == 3
    assert da.StudyInstanceUID != orig.StudyInstanceUID


def test_sample_files_readable_and_distinct(samples: dict[str, Path]) -> None:
    dss = {k: pydicom.dcmread(p) for k, p in samples.items()}
    assert len({ds.SOPInstanceUID for ds in dss.values()}) == len(dss)
    for key, ts in EXPECTED_TS.items():
        assert dss[key].file_meta.TransferSyntaxUID == ts, key
    assert dss["cr15"].BitsStored == 15
    assert dss["cr10"].BitsStored == 10
    assert int(dss["multiframe"].NumberOfFrames) > 1
    assert dss["rgb"].SamplesPerPixel == 3
    for key, ds in dss.items():
        assert ds.pixel_array.size > 0, key


def test_signed_ct_12bit(tmp_path: Path) -> None:
    for sign_extend in (True, False):
        ds = pydicom.dcmread(dicomdata.signed_ct_12bit(tmp_path, sign_extend=sign_extend))
        assert ds.PixelRepresentation == 1
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        arr = ds.pixel_array
        assert arr.dtype == np.int16
        assert arr.min() >= -2048 and arr.max() <= 2047
        assert arr.min() < 0  # real negative HU: sign handling is exercised
        assert np.array_equal(arr, dicomdata.signed_ct_12bit_values())
    raw = np.frombuffer(ds.PixelData, "<u2")
    assert raw.max() <= 0x0FFF  # sign_extend=False: high bits really are zero


# ---------------------------------------------------------------- real peers


@pytest.mark.peers
def test_orthanc_receives_storescu_and_stops_by_pid(
    orthanc: peers.OrthancProcess, tmp_path: Path
) -> None:
    assert peers.echoscu(orthanc.dicom_port, aec=orthanc.aet).returncode == 0
    files = dicomdata.ct_series(tmp_path / "ct", 5)
    res = peers.storescu(orthanc.dicom_port, files, aec=orthanc.aet)
    assert res.returncode == 0, res.stdout
    results = peers.parse_storescu_log(res.stdout)
    assert results == {str(f): "Success" for f in files}, res.stdout
    assert peers.store_ok(res, files)

    assert len(orthanc.instances()) == 5
    assert orthanc.statistics()["CountInstances"] == 5
    sop = pydicom.dcmread(files[2]).SOPInstanceUID
    oid = orthanc.find_instance(sop)
    assert oid is not None
    assert orthanc.instance_tags(oid)["SOPInstanceUID"] == sop
    stored = orthanc.instance_dataset(oid)
    assert np.array_equal(stored.pixel_array, dicomdata.ct_slice_pixels())
    assert orthanc.frame_raw(oid) == dicomdata.ct_slice_pixels().astype("<i2").tobytes()

    pid = orthanc.pid
    assert peers.pid_alive(pid)
    orthanc.stop()
    assert not peers.pid_alive(pid)
    assert not peers.port_open(peers.LOOPBACK, orthanc.http_port)


@pytest.mark.peers
def test_storescu_compressed_and_failure(
    orthanc: peers.OrthancProcess, samples: dict[str, Path]
) -> None:
    """Compressed files go as they are with the auto ``-x`` flag; without it storescu
    cannot send them, and the parsed log (not the exit code) says so."""
    j2k = samples["j2k"]
    bad = peers.storescu(orthanc.dicom_port, [j2k], aec=orthanc.aet, ts_flag=None)
    assert peers.parse_storescu_log(bad.stdout)[str(j2k)].startswith("Failed"), bad.stdout
    assert not peers.store_ok(bad, [j2k])

    for key in ("j2k", "jpeg_ls", "rle", "jpeg_lossy"):
        res = peers.storescu(orthanc.dicom_port, [samples[key]], aec=orthanc.aet)
        assert peers.store_ok(res, [samples[key]]), res.stdout
        oid = orthanc.find_instance(pydicom.dcmread(samples[key]).SOPInstanceUID)
        assert oid is not None
        assert orthanc.instance_transfer_syntax(oid) == EXPECTED_TS[key]

    with pytest.raises(ValueError, match="split"):
        peers.storescu_ts_flag([samples["j2k"], samples["rle"]])


@pytest.mark.peers
def test_orthanc_pushes_to_storescp(
    make_orthanc: peers.OrthancProcess, make_storescp: peers.StorescpProcess, samples
) -> None:
    scp = make_storescp()
    orthanc = make_orthanc(modalities={"STORESCP": (peers.LOOPBACK, scp.port)})
    oid = orthanc.upload(samples["signed12"])["ID"]
    orthanc.store_to_modality("STORESCP", [oid])
    received = scp.received()
    assert len(received) == 1
    got = pydicom.dcmread(received[0])
    assert np.array_equal(got.pixel_array, dicomdata.signed_ct_12bit_values())

    # a modality added at run time works as well
    orthanc.put_modality("LATE", scp.aet, peers.LOOPBACK, scp.port)
    orthanc.echo_modality("LATE")
