"""The acceptance policy on real, odd files: an archive never refuses what it can store safely.

Every file shipped with pydicom and pydicom-data is sent as stored (tests/edge_corpus.py).
Orthanc 1.10 stores 128 of 134 such files; the node must keep at least 129, answer every
one with a status, stay up, and give each stored object back: in the syntax asked for where
its pixels decode, and byte for byte as stored in any case.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import dicomdata
import edge_corpus
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, wait_compressed

# Refused, and why: the JPEG-LS near-lossless test files of pydicom-data carry no Study
# Instance UID, so they cannot be indexed.
EXPECTED_REFUSALS = {
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jls_lossy_sample.dcm",
}


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory, debian_peers: None):
    tmp = tmp_path_factory.mktemp("corpus")
    node = peers.CompacsProcess(tmp / "data")
    node.start()
    try:
        sent = edge_corpus.send_corpus(tmp / "copies", node.port, node.ae_title)
        yield node, sent, tmp
    finally:
        node.stop()


def test_every_file_gets_a_status_and_at_least_129_are_kept(corpus_node) -> None:
    node, sent, _tmp = corpus_node
    assert len(sent) >= 134
    assert node.running, node.log_tail()
    table = collections.Counter(
        "stored" if r.status == 0 else f"0x{r.status:04X}" if r.status is not None else r.error
        for r in sent
    )
    unanswered = [r.source.name for r in sent if r.status is None]
    assert not unanswered, (unanswered, [r.error for r in sent if r.status is None])
    refused = {r.source.name for r in sent if r.status != 0}
    assert refused <= EXPECTED_REFUSALS, (refused - EXPECTED_REFUSALS, table)
    assert table["stored"] >= 129, table
    stats = wait_compressed(node, table["stored"])
    assert stats["instances"] == table["stored"]
    log = node.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:4000]
    for name in EXPECTED_REFUSALS:
        assert "missing StudyInstanceUID" in log, name


def test_every_stored_object_exports(corpus_node) -> None:
    """As stored: all of them, and those kept as received byte for byte. In the default
    syntax (explicit VR little endian): all of them, those whose pixel data does not decode
    written as stored and listed; asked for explicitly, those fail, the export goes on."""
    node, sent, tmp = corpus_node
    stored = [r for r in sent if r.status == 0]
    out = tmp / "as-stored"
    res = node.export(out, transfer_syntax="stored")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = {
            str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID): p
            for p in out.rglob("*.dcm")
        }
    assert {r.sop_instance_uid for r in stored} <= set(exported)
    as_received = {row["sop"] for row in _codecs(node) if row["codec"] == "passthrough"}
    for r in stored:
        if r.sop_instance_uid in as_received:
            assert _pixel_bytes(exported[r.sop_instance_uid]) == _pixel_bytes(r.copy), r.source

    verify = node.verify()
    flagged = [line for line in verify.stdout.splitlines() if "flagged" in line]
    out = tmp / "default"
    res = node.export(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(list(out.rglob("*.dcm"))) == len(stored)
    kept = [line for line in res.stdout.splitlines() if line.startswith("AS STORED")]
    # written as stored: an object the index flags (pixel data that does not decode or
    # disagrees with its attributes), nothing else
    for line in kept:
        sop = line.split()[3]
        assert any(f"SOP {sop} " in f for f in flagged), (line, flagged)

    out = tmp / "explicit"
    res = node.export(out, transfer_syntax="1.2.840.10008.1.2.1")
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert sorted(line.split()[2] for line in failed) == sorted(line.split()[3] for line in kept)
    assert res.returncode == (1 if failed else 0)
    assert len(list(out.rglob("*.dcm"))) == len(stored) - len(failed)


def _codecs(node: peers.CompacsProcess) -> list[dict]:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT sop_instance_uid, codec FROM instance")).all()
    engine.dispose()
    return [{"sop": sop, "codec": codec} for sop, codec in rows]


def _pixel_bytes(path: Path) -> bytes | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        return ds.get("PixelData") if "PixelData" in ds else None


def test_jp2_framed_j2k_comes_back_pixel_exact_uncompressed(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    src = dicomdata.fresh_copy("GDCMJ2K_TextGBR.dcm", tmp_path)
    res = compacs_node.store([src])
    assert peers.store_ok(res, [src]), res.stdout[-2000:]
    wait_compressed(compacs_node, 1)
    study = pydicom.dcmread(src).StudyInstanceUID
    out = tmp_path / "get"
    res = peers.getscu(compacs_node.port, "STUDY", {"StudyInstanceUID": study}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    (got,) = list(out.iterdir())
    received = pydicom.dcmread(got)
    assert received.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    assert received.PhotometricInterpretation == "RGB"
    assert np.array_equal(received.pixel_array, pydicom.dcmread(src).pixel_array)


def test_retired_ultrasound_class_is_accepted_and_retrieved(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    src = dicomdata.fresh_copy("color-pl.dcm", tmp_path)
    assert str(pydicom.dcmread(src).SOPClassUID) == "1.2.840.10008.5.1.4.1.1.6"  # retired
    assert edge_corpus.send_as_stored(src, compacs_node.port, compacs_node.ae_title) == 0
    wait_compressed(compacs_node, 1)
    study = pydicom.dcmread(src).StudyInstanceUID
    out = tmp_path / "get"
    res = peers.getscu(compacs_node.port, "STUDY", {"StudyInstanceUID": study}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    (got,) = list(out.iterdir())
    assert np.array_equal(dicomdata.read_pixels(got), pydicom.dcmread(src).pixel_array)


def test_strict_policy_refuses_padded_pixel_data(make_node, tmp_path: Path) -> None:
    src = dicomdata.fresh_copy("MR_small_padded.dcm", tmp_path)
    strict = make_node("[ingest]\nstrict = true\n")
    assert edge_corpus.send_as_stored(src, strict.port, strict.ae_title) == 0xA900
    lenient = make_node()
    assert edge_corpus.send_as_stored(src, lenient.port, lenient.ae_title) == 0x0000
    stats = wait_compressed(lenient, 1)
    assert stats["flagged"] == 1
    out = tmp_path / "out"
    assert lenient.export(out, transfer_syntax="stored").returncode == 0
    (exported,) = exported_by_sop(out).values()
    assert pydicom.dcmread(exported).PixelData == pydicom.dcmread(src).PixelData
