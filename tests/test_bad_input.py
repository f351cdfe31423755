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
        ds.SeriesInstanceUID = "..\\.."  # a backslash makes it two values

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

    refused = {  # no usable Study, Series or SOP Instance UID: refused whatever the policy
        "missing StudyInstanceUID": missing_study,
        "missing SeriesInstanceUID": missing_series,
        "UID of dots and backslashes": dotdot_uid,
        "UID over 64 characters": too_long_uid,
    }
    kept = {  # identifiable, non-conformant: kept as received and flagged (strict: refused)
        "UID with / and ..": slash_uid,
        "UID with letters": letters_uid,
        "truncated pixel data": truncated_pixels,
        "Rows disagree with pixel data": rows_disagree,
        "NumberOfFrames disagrees": frames_disagree,
    }
    return refused, kept


def _send_all(node, tmp_path: Path, cases: dict) -> dict[str, tuple[int, pydicom.Dataset]]:
    """Each broken object on one association, then a good one on the same association."""
    assoc = associate(node)
    results = {}
    try:
        for name, breaker in cases.items():
            ds = ct(tmp_path)
            breaker(ds)
            status = assoc.send_c_store(ds)
            results[name] = (status.Status if status else None, ds)
        assert assoc.send_c_store(ct(tmp_path)).Status == 0x0000  # it keeps serving
    finally:
        assoc.release()
    return results


def test_unidentifiable_objects_are_refused_and_nothing_is_stored(
    compacs_node, tmp_path: Path
) -> None:
    refused, _kept = breakers()
    for name, (status, _ds) in _send_all(compacs_node, tmp_path, refused).items():
        assert status == 0xA900, f"{name}: {status}"
    stats = wait_compressed(compacs_node, 1)
    assert stats["instances"] == 1 and stats["flagged"] == 0  # nothing partial
    log = compacs_node.log_text()
    assert "refused from BADSCU" in log and "missing StudyInstanceUID" in log
    assert "cannot identify an object" in log
    assert compacs_node.verify().returncode == 0


def test_non_conformant_objects_are_kept_as_received_and_flagged(
    compacs_node, tmp_path: Path
) -> None:
    """An archive never refuses what it can store safely: each is acknowledged, kept byte for
    byte, flagged in the index (stats counts them, verify lists them) and logged."""
    _refused, kept = breakers()
    results = _send_all(compacs_node, tmp_path, kept)
    for name, (status, _ds) in results.items():
        assert status == 0x0000, f"{name}: {status}"
    stats = wait_compressed(compacs_node, 1 + len(kept))
    assert stats["flagged"] == len(kept), stats
    # the pixel data that disagrees with its attributes is not compressed: kept as sent
    assert stats["by_codec"]["passthrough"]["instances"] == 3, stats["by_codec"]
    res = compacs_node.verify()
    assert res.returncode == 1
    for _name, (_status, ds) in results.items():
        assert f"SOP {ds.SOPInstanceUID} " in res.stdout and "flagged" in res.stdout
    out = tmp_path / "out"
    assert compacs_node.export(out, transfer_syntax="stored").returncode == 0
    exported = {pydicom.dcmread(p, force=True).SOPInstanceUID: p for p in out.rglob("*.dcm")}
    ds = results["truncated pixel data"][1]
    assert pydicom.dcmread(exported[ds.SOPInstanceUID]).PixelData == ds.PixelData
    log = compacs_node.log_text()
    assert "non-conformant object from BADSCU kept as received" in log
    assert "is not a valid UID" in log and "PixelData is" in log


def test_strict_policy_refuses_non_conformant_objects(make_node, tmp_path: Path) -> None:
    node = make_node("[ingest]\nstrict = true\n")
    _refused, kept = breakers()
    for name, (status, _ds) in _send_all(node, tmp_path, kept).items():
        assert status == 0xA900, f"{name}: {status}"
    assert wait_compressed(node, 1)["instances"] == 1
    assert "([ingest] strict = true)" in node.log_text()


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


def test_any_sop_class_is_stored_when_the_config_says_so(make_node, tmp_path: Path) -> None:
    node = make_node("[ingest]\naccept_any_sop_class = true\n")
    private = "1.2.826.0.1.3680043.8.498.1.77"  # a private storage SOP class
    ds = ct(tmp_path)
    ds.SOPClassUID = private
    ds.file_meta.MediaStorageSOPClassUID = private
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(private, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    try:
        assert assoc.is_established and assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert wait_compressed(node, 1)["instances"] == 1


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
