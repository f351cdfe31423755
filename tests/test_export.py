"""`compacs export` never stops at an undecodable object (issue 20 item 9, invariant 7).

The object is real compressed data damaged as it happens in the field: pydicom's JPEG-LS
lossless multi-frame MR (emri_small_jpeg_ls_lossless.dcm) with the start of one frame's
codestream overwritten, so that CharLS refuses it. The node stores it as it arrived; its
bytes are intact, only its pixels do not decode.
"""

from __future__ import annotations

from pathlib import Path

import dicomdata
import edge_corpus
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, wait_compressed
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat

pytestmark = pytest.mark.peers


def corrupt_jpeg_ls(out_dir: Path) -> Path:
    """The real JPEG-LS object with frame 3's SOI marker overwritten (fresh UIDs)."""
    src = dicomdata.fresh_copy("emri_small_jpeg_ls_lossless.dcm", out_dir)
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    frames[3] = b"\x00\x00" + frames[3][2:]
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.save_as(src, enforce_file_format=True)
    codec = registry.by_transfer_syntax(JPEGLSLossless)
    with pytest.raises(Exception):  # noqa: B017 - whatever CharLS raises: it does not decode
        codec.decode_frame(frames[3], PixelFormat.from_dataset(ds))
    return src


def test_export_writes_an_undecodable_object_as_stored_or_fails_it_alone(
    compacs_node, tmp_path: Path
) -> None:
    bad = corrupt_jpeg_ls(tmp_path / "bad")
    bad_sop = str(pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID)
    good = dicomdata.ct_series(tmp_path / "ct", 2)
    assert edge_corpus.send_as_stored(bad, compacs_node.port, compacs_node.ae_title) == 0
    assert peers.store_ok(compacs_node.store(good), good)
    wait_compressed(compacs_node, 3)

    # the default syntax: the undecodable object is written as stored and listed; exit 0
    out = tmp_path / "default"
    res = compacs_node.export(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    exported = exported_by_sop(out)
    assert len(exported) == 3
    (listed,) = [line for line in res.stdout.splitlines() if line.startswith("AS STORED")]
    assert f"SOP {bad_sop} " in listed and "written as stored (JPEG-LS Lossless" in listed
    assert "exported 3 instance(s) (1 as stored)" in res.stdout and "0 failed" in res.stdout
    as_stored = pydicom.dcmread(exported[bad_sop])
    assert as_stored.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert as_stored.PixelData == pydicom.dcmread(bad).PixelData
    for path in good:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        written = pydicom.dcmread(exported[sop])
        assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert written.PixelData == pydicom.dcmread(path).PixelData

    # an explicit syntax it cannot meet: that object fails, the others are written; exit 1
    out = tmp_path / "explicit"
    res = compacs_node.export(out, transfer_syntax=ExplicitVRLittleEndian)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    exported = exported_by_sop(out)
    assert len(exported) == 2 and bad_sop not in exported
    (failed,) = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert f"SOP {bad_sop} " in failed, failed
    assert "exported 2 instance(s)" in res.stdout and "1 failed" in res.stdout
    assert not list(out.rglob(f"{bad_sop}*")), "a half-written file was left"
