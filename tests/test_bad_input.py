"""Invariant 6: bad input gets a DICOM failure status and a log line, never a crash.

The sender here is pynetdicom (not storescu) because storescu refuses to send most of these
broken objects; each case is sent on the same association as a good object afterwards, to
show the association and the node keep serving.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dicomdata
import pydicom
import pytest
from nodecheck import wait_compressed
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage


def associate(node, contexts=None):
    ae = AE(ae_title="BADSCU")
    for cx in contexts or [build_context(CTImageStorage, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def ct(tmp_path: Path) -> pydicom.Dataset:
    (path,) = dicomdata.ct_series(tmp_path / f"ct{len(list(tmp_path.iterdir()))}", 1)
    return pydicom.dcmread(path)


def breakers():
    def missing_study(ds):
        del ds.StudyInstanceUID

    def missing_series(ds):
        del ds.SeriesInstanceUID

    def slash_uid(ds):
        ds.StudyInstanceUID = "1.2.3/../../etc"

    def dotdot_uid(ds):
        ds.SeriesInstanceUID = "..\\.."

    def letters_uid(ds):
        ds.StudyInstanceUID = "1.2.abc.4"

    def too_long_uid(ds):
        ds.SeriesInstanceUID = "1." + "2" * 70

    def truncated_pixels(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    def rows_disagree(ds):
        ds.Rows = ds.Rows + 10

    def frames_disagree(ds):
        ds.NumberOfFrames = 3

    return {
        "missing StudyInstanceUID": (missing_study, 0xA900),
        "missing SeriesInstanceUID": (missing_series, 0xA900),
        "UID with / and ..": (slash_uid, 0xA900),
        "UID of dots and backslashes": (dotdot_uid, 0xA900),
        "UID with letters": (letters_uid, 0xA900),
        "UID over 64 characters": (too_long_uid, 0xA900),
        "truncated pixel data": (truncated_pixels, 0xA900),
        "Rows disagree with pixel data": (rows_disagree, 0xA900),
        "NumberOfFrames disagrees": (frames_disagree, 0xA900),
    }


def test_bad_datasets_get_failure_status_and_nothing_is_stored(
    compacs_node, tmp_path: Path
) -> None:
    assoc = associate(compacs_node)
    try:
        for name, (breaker, expected) in breakers().items():
            ds = ct(tmp_path)
            breaker(ds)
            status = assoc.send_c_store(ds)
            assert status and status.Status == expected, f"{name}: {status}"
        good = ct(tmp_path)
        status = assoc.send_c_store(good)
        assert status.Status == 0x0000  # the same association keeps serving
    finally:
        assoc.release()
    stats = wait_compressed(compacs_node, 1)
    assert stats["instances"] == 1  # nothing partial from the bad ones
    log = compacs_node.log_text()
    assert "refused from BADSCU" in log and "missing StudyInstanceUID" in log
    assert "PixelData is" in log
    assert compacs_node.verify().returncode == 0


def test_undecodable_dataset_gets_c000(compacs_node, tmp_path: Path, monkeypatch) -> None:
    import pynetdicom.association

    good = pydicom.dcmread(dicomdata.ct_series(tmp_path / "g", 1)[0])
    encode = pynetdicom.association.encode

    def garbled(ds, *args):  # what a broken sender puts on the wire: a dataset cut off mid-tag
        return encode(ds, *args)[:300] + b"\xff" * 8

    assoc = associate(compacs_node)
    try:
        monkeypatch.setattr(pynetdicom.association, "encode", garbled)
        status = assoc.send_c_store(good)
        # pydicom reads what it can: either nothing decodes (0xC000) or the UIDs are gone (0xA900)
        assert status and status.Status in (0xC000, 0xA900), status
        monkeypatch.setattr(pynetdicom.association, "encode", encode)
        assert assoc.send_c_store(good).Status == 0x0000  # the association keeps serving
    finally:
        assoc.release()
    assert "refused from BADSCU" in compacs_node.log_text()
    assert compacs_node.echo().returncode == 0


def test_unknown_sop_class_is_refused_in_negotiation(compacs_node) -> None:
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context("1.2.3.4.5.6.7.8", ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(compacs_node.host, compacs_node.port, ae_title=compacs_node.ae_title)
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert "1.2.3.4.5.6.7.8" not in accepted and CTImageStorage in accepted
    finally:
        assoc.release()


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount")
def test_disk_full_gets_a700_and_service_resumes(make_node, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")
    try:
        index = f"sqlite:///{tmp_path / 'index.sqlite'}"
        node = make_node(env={"COMPACS_INDEX_URL": index}, data_dir=small / "data")
        filler = small / "filler"
        filler.write_bytes(b"\x00" * (3 * 1024 * 1024))
        files = dicomdata.ct_series(tmp_path / "ct", 6)  # 512 KiB each, uncompressed
        assoc = associate(node)
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files[:4]]
        assoc.release()
        assert 0xA700 in statuses, statuses
        refused = [f for f, s in zip(files, statuses, strict=False) if s == 0xA700]
        assert "disk full" in node.log_text()
        filler.unlink()  # space returns
        assoc = associate(node)
        for f in refused + files[4:]:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
        assoc.release()
        stats = wait_compressed(node, 6)
        assert stats["instances"] == 6
        assert node.verify().returncode == 0
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
