"""C-STORE into a real compacs process with DCMTK storescu, export, pixel-exact comparison.

Covers invariant 2 end to end (lossless is bit-exact), the default rules, lossy arrivals
stored as received, duplicates, and the stats/verify/export commands.
"""

from __future__ import annotations

from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
from nodecheck import exported_by_sop, raw_pixels, store_all, wait_compressed

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def test_echo(compacs_node: peers.CompacsProcess) -> None:
    assert compacs_node.echo().returncode == 0


def test_every_lossless_path_is_pixel_exact(
    compacs_node: peers.CompacsProcess, samples: dict[str, Path], tmp_path: Path
) -> None:
    files = list(samples.values())
    store_all(compacs_node, files)
    stats = wait_compressed(compacs_node, len(files))
    assert stats["instances"] == len(files)

    out = tmp_path / "export"
    res = compacs_node.export(out)
    assert res.returncode == 0, res.stderr
    exported = exported_by_sop(out)
    for key, original in samples.items():
        src = pydicom.dcmread(original)
        got_path = exported[src.SOPInstanceUID]
        got = pydicom.dcmread(got_path)
        assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE, key
        if key == "jpeg_lossy":  # decoded once by pydicom on both sides: same decoder, same pixels
            assert np.array_equal(got.pixel_array, src.pixel_array), key
            continue
        assert np.array_equal(raw_pixels(got_path), raw_pixels(original)), key
        assert got.PatientName == src.PatientName and got.SOPClassUID == src.SOPClassUID, key

    by_codec = stats["by_codec"]
    assert by_codec["jpegls"]["instances"] >= 8  # CT, MR, CR x2, multi-frame, signed12, US, ...
    assert "passthrough" in by_codec  # SC (modality OT) and the lossy JPEG
    assert stats["ratio"] > 1.5

    verify = compacs_node.verify()
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_lossy_arrival_stored_byte_for_byte(
    compacs_node: peers.CompacsProcess, samples: dict[str, Path], tmp_path: Path
) -> None:
    src = dicomdata.fresh_copy(dicomdata.SAMPLE_SOURCES["jpeg_lossy"], tmp_path, name="lossy.dcm")
    store_all(compacs_node, [src])
    wait_compressed(compacs_node, 1)
    out = tmp_path / "out"
    res = compacs_node.export(out, transfer_syntax="1.2.840.10008.1.2.4.50")
    assert res.returncode == 0, res.stderr
    (got,) = out.rglob("*.dcm")
    assert pydicom.dcmread(got).PixelData == pydicom.dcmread(src).PixelData


def test_ct_is_stored_as_jpegls_and_passes_through_on_export(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    files = dicomdata.ct_series(tmp_path / "ct", 5)
    store_all(compacs_node, files)
    stats = wait_compressed(compacs_node, 5)
    assert stats["by_codec"]["jpegls"]["instances"] == 5
    assert stats["by_modality"]["CT"]["ratio"] > 2
    out = tmp_path / "out"
    assert compacs_node.export(out, transfer_syntax=JPEG_LS).returncode == 0
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEG_LS
        # the codestream starts with SOI + SOF55 (no SPIFF header)
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        assert frame[:4] == b"\xff\xd8\xff\xf7"


def test_resend_same_instance_is_not_duplicated(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    (first,) = dicomdata.ct_series(tmp_path / "a", 1)
    store_all(compacs_node, [first])
    wait_compressed(compacs_node, 1)
    store_all(compacs_node, [first])
    # same UID, other pixels: default keep_first acknowledges, keeps the first, warns
    ds = pydicom.dcmread(first)
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    store_all(compacs_node, [changed])
    stats = wait_compressed(compacs_node, 1)
    assert stats["instances"] == 1
    assert "keeping the first" in compacs_node.log_text()
    out = tmp_path / "out"
    assert compacs_node.export(out).returncode == 0
    (got,) = out.rglob("*.dcm")
    assert np.array_equal(pydicom.dcmread(got).pixel_array, pydicom.dcmread(first).pixel_array)


def test_resend_with_replace_policy_keeps_the_newest(make_node, tmp_path: Path) -> None:
    node = make_node('[node]\non_duplicate = "replace"\n')
    (first,) = dicomdata.ct_series(tmp_path / "a", 1)
    store_all(node, [first])
    wait_compressed(node, 1)
    ds = pydicom.dcmread(first)
    arr = ds.pixel_array.copy()
    arr[10, 10] += 7
    ds.PixelData = arr.tobytes()
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    store_all(node, [changed])
    stats = wait_compressed(node, 1)
    assert stats["instances"] == 1
    out = tmp_path / "out"
    assert node.export(out).returncode == 0
    (got,) = out.rglob("*.dcm")
    assert np.array_equal(pydicom.dcmread(got).pixel_array, arr)
    assert node.verify().returncode == 0  # the first version's blob is gone, no orphan


def _corrected_report(tmp_path: Path) -> tuple[Path, Path]:
    """A real SR (no pixel data), and the same SOP Instance re-sent with a corrected text."""
    first = dicomdata.fresh_copy("reportsi.dcm", tmp_path / "sr")
    ds = pydicom.dcmread(first)
    ds.ContentDate = "20261201"
    ds.PatientName = "CORRECTED^NAME"
    corrected = tmp_path / "sr" / "corrected.dcm"
    ds.save_as(corrected)
    return first, corrected


def test_corrected_report_is_not_dropped_as_the_same(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    """keep_first (default): kept first, with a warning and an audit event; never answered
    as a harmless re-send of the same data set."""
    first, corrected = _corrected_report(tmp_path)
    store_all(compacs_node, [first])
    wait_compressed(compacs_node, 1)
    store_all(compacs_node, [first])  # the very same data set: a harmless re-send
    assert "already stored, same data set" in compacs_node.log_text()
    store_all(compacs_node, [corrected])
    wait_compressed(compacs_node, 1)
    log = compacs_node.log_text()
    assert "re-sent from STORESCU with different content" in log and "keeping the first" in log


def test_replace_takes_the_corrected_report_and_its_index_values(make_node, tmp_path: Path) -> None:
    node = make_node('[node]\non_duplicate = "replace"\n')
    first, corrected = _corrected_report(tmp_path)
    store_all(node, [first])
    wait_compressed(node, 1)
    store_all(node, [corrected])
    wait_compressed(node, 1)
    out = tmp_path / "out"
    assert node.export(out).returncode == 0
    (got,) = out.rglob("*.dcm")
    assert pydicom.dcmread(got).ContentDate == "20261201"
    # the index answers C-FIND with the corrected patient values
    res = peers.findscu(node.port, "STUDY", {"PatientName": "CORRECTED*", "StudyInstanceUID": ""})
    assert "CORRECTED^NAME" in res.stdout, res.stdout[-2000:]
    assert node.verify().returncode == 0


def test_replace_moves_an_image_re_sent_under_another_series(make_node, tmp_path: Path) -> None:
    """A metadata-only correction of an image: same pixels, the instance now in another
    series of another study; the old series counts one instance less."""
    node = make_node('[node]\non_duplicate = "replace"\n')
    (first,) = dicomdata.ct_series(tmp_path / "a", 1)
    store_all(node, [first])
    wait_compressed(node, 1)
    ds = pydicom.dcmread(first)
    old_study = ds.StudyInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    store_all(node, [moved])
    wait_compressed(node, 1)
    res = peers.findscu(
        node.port,
        "STUDY",
        {"StudyInstanceUID": old_study, "NumberOfStudyRelatedInstances": ""},
    )
    counts = [line for line in res.stdout.splitlines() if "IS [" in line and "RelatedInst" in line]
    assert counts and all("IS [0 ]" in line for line in counts), res.stdout[-2000:]
    res = peers.findscu(node.port, "STUDY", {"StudyInstanceUID": ds.StudyInstanceUID})
    assert ds.StudyInstanceUID in res.stdout
