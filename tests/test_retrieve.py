"""C-GET and C-MOVE with real peers (invariant 4: a syntax the peer accepted).

getscu proposing only explicit VR LE, and proposing JPEG-LS (stored bytes pass through);
movescu to a DCMTK storescp; Orthanc 1.10 pushing to compacs, C-FINDing and C-MOVEing back,
and decoding every instance it got; a 300-instance C-GET with the node's RSS flat; a big
object (over wire.STREAM_ABOVE) retrieved both ways (streamed from its blob with the fast
paths; test_memory.py measures its memory).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dicomdata
import numpy as np
import peers
import psutil
import pydicom
import pytest
from nodecheck import store_all, wait_compressed

from compacs.service.wire import STREAM_ABOVE

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def by_sop(folder: Path) -> dict[str, pydicom.Dataset]:
    return {
        ds.SOPInstanceUID: ds
        for ds in (pydicom.dcmread(p) for p in folder.rglob("*") if p.is_file())
    }


@pytest.fixture
def stored_study(compacs_node, samples, tmp_path: Path) -> tuple[str, list[Path]]:
    """A study of real images of several kinds, stored (and compressed) in the node."""
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 3, study_uid=study)
    for key in ("mr", "multiframe", "signed12", "us_rgb", "cr10"):
        files.append(dicomdata.fresh_copy(samples[key], tmp_path / "in", StudyInstanceUID=study))
    store_all(compacs_node, files)
    wait_compressed(compacs_node, len(files))
    return study, files


def test_getscu_uncompressed_only_gets_exact_pixels(
    compacs_node, stored_study, tmp_path: Path, fast_paths: bool
) -> None:
    study, files = stored_study
    paths = "pynetdicom fast paths on" if fast_paths else "pynetdicom fast paths off"
    assert paths in compacs_node.log_text()
    out = tmp_path / "get"
    res = peers.getscu(compacs_node.port, "STUDY", {"StudyInstanceUID": study}, out, extra=())
    assert res.returncode == 0, res.stdout[-3000:]
    got = by_sop(out)
    assert len(got) == len(files)
    for f in files:
        src = pydicom.dcmread(f)
        ds = got[src.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID in (EXPLICIT_LE, "1.2.840.10008.1.2")
        assert np.array_equal(ds.pixel_array, src.pixel_array)


def test_getscu_jpegls_gets_stored_bytes_unchanged(
    compacs_node, stored_study, tmp_path: Path
) -> None:
    study, files = stored_study
    out = tmp_path / "get"
    res = peers.getscu(compacs_node.port, "STUDY", {"StudyInstanceUID": study}, out, extra=("+xt",))
    assert res.returncode == 0, res.stdout[-3000:]
    got = by_sop(out)
    stored = {}
    for blob in (compacs_node.data_dir / "archive" / "hot").rglob("*.dcm"):
        ds = pydicom.dcmread(blob)
        stored[ds.SOPInstanceUID] = ds
    jpegls = 0
    for f in files:
        src = pydicom.dcmread(f)
        ds = got[src.SOPInstanceUID]
        assert np.array_equal(ds.pixel_array, src.pixel_array)
        if stored[src.SOPInstanceUID].file_meta.TransferSyntaxUID == JPEG_LS:
            assert ds.file_meta.TransferSyntaxUID == JPEG_LS
            assert ds.PixelData == stored[src.SOPInstanceUID].PixelData  # passed through
            jpegls += 1
    assert jpegls >= 5


def test_get_series_and_image_level_and_unknown_uid(
    compacs_node, stored_study, tmp_path: Path
) -> None:
    study, files = stored_study
    first = pydicom.dcmread(files[0])
    out = tmp_path / "series"
    res = peers.getscu(
        compacs_node.port,
        "SERIES",
        {"StudyInstanceUID": study, "SeriesInstanceUID": first.SeriesInstanceUID},
        out,
    )
    assert res.returncode == 0
    assert len(by_sop(out)) == 3  # the three CT slices share a series
    out = tmp_path / "image"
    res = peers.getscu(
        compacs_node.port,
        "IMAGE",
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": first.SeriesInstanceUID,
            "SOPInstanceUID": first.SOPInstanceUID,
        },
        out,
    )
    assert list(by_sop(out)) == [first.SOPInstanceUID]
    res = peers.getscu(
        compacs_node.port, "STUDY", {"StudyInstanceUID": "1.2.3.4.5"}, tmp_path / "none"
    )
    assert not by_sop(tmp_path / "none")


def test_movescu_to_storescp(make_node, make_storescp, samples, tmp_path: Path) -> None:
    storescp = make_storescp()
    node = make_node(f'[move_destinations]\nSTORESCP = "127.0.0.1:{storescp.port}"\n')
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 4, study_uid=study)
    files.append(dicomdata.fresh_copy(samples["signed12"], tmp_path / "in", StudyInstanceUID=study))
    store_all(node, files)
    wait_compressed(node, len(files))
    res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "STORESCP")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Received Move Response 5 (Pending)" in res.stdout
    assert "Received Final Move Response (Success)" in res.stdout
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in storescp.received()}
    for f in files:
        src = pydicom.dcmread(f)
        ds = pydicom.dcmread(got[src.SOPInstanceUID])
        assert ds.file_meta.TransferSyntaxUID == JPEG_LS  # storescp +xa accepts the stored one
        assert np.array_equal(ds.pixel_array, src.pixel_array)
    res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "NOWHERE")
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in res.stdout  # 0xA801


def test_back_to_back_cmove_suboperations_all_complete(
    make_node, make_storescp, tmp_path: Path
) -> None:
    """Five C-MOVEs of 120 instances in a row, all completed. Back-to-back sub-operations
    once let the sub-association's reactor take a C-STORE response (bulk_store's
    _pause_reactor): in a stress run of 300-instance moves, 6 of 10 had a sub-operation
    waiting out the DIMSE timeout and ending with a warning; this caught it most times."""
    storescp = make_storescp()
    node = make_node(f'[move_destinations]\nSTORESCP = "127.0.0.1:{storescp.port}"\n')
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = [
        dicomdata.fresh_copy(
            "CT_small.dcm", tmp_path / "in", StudyInstanceUID=study, SeriesInstanceUID=series
        )
        for _ in range(120)
    ]
    store_all(node, files)
    wait_compressed(node, len(files))
    for _ in range(5):
        res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "STORESCP")
        assert res.returncode == 0, res.stdout[-3000:]
        assert "Received Final Move Response (Success)" in res.stdout, res.stdout[-3000:]
    assert "unexpected C-STORE" not in node.log_text()


def orthanc_pixels(orthanc: peers.OrthancProcess, instance_id: str, signed: bool) -> np.ndarray:
    """Pixels as Orthanc itself decodes them (its PNG frame endpoint), not our decoder."""
    import imagecodecs

    kind = "image-int16" if signed else "image-uint16"
    png = orthanc.get_bytes(f"/instances/{instance_id}/frames/0/{kind}")
    pixels = imagecodecs.png_decode(png)  # PNG has no signed type: int16 comes as its bit pattern
    return pixels.astype(np.uint16).view(np.int16) if signed else pixels


def test_orthanc_pushes_finds_moves_back_and_decodes(
    make_node, make_orthanc, tmp_path: Path
) -> None:
    orthanc = make_orthanc()
    node = make_node(f'[move_destinations]\nORTHANC = "127.0.0.1:{orthanc.dicom_port}"\n')
    orthanc.put_modality("compacs", node.ae_title, "127.0.0.1", node.port)
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 4, study_uid=study, PatientName="ORTHANC^TEST")
    files.append(
        dicomdata.signed_ct_12bit(
            tmp_path / "s", StudyInstanceUID=study, PatientName="ORTHANC^TEST"
        )
    )
    ids = [orthanc.upload(f)["ID"] for f in files]
    orthanc.store_to_modality("compacs", ids)  # Orthanc pushes the study to compacs
    wait_compressed(node, len(files))
    for instance_id in ids:
        orthanc.delete(f"/instances/{instance_id}")
    assert not orthanc.instances()

    answers = orthanc.query_modality(
        "compacs", "Study", {"StudyInstanceUID": study, "PatientName": ""}
    )
    assert [a["StudyInstanceUID"] for a in answers] == [study]
    orthanc.move_from_modality("compacs", "Study", [{"StudyInstanceUID": study}])
    assert len(orthanc.instances()) == len(files)
    for f in files:
        src = pydicom.dcmread(f)
        instance_id = orthanc.find_instance(src.SOPInstanceUID)
        assert orthanc.instance_transfer_syntax(instance_id) == JPEG_LS
        pixels = orthanc_pixels(orthanc, instance_id, signed=src.PixelRepresentation == 1)
        pixels = pixels.reshape(src.pixel_array.shape)
        # Orthanc 1.10 (DCMTK's JPEG-LS decoder) leaves the bits above BitsStored zero for
        # signed data instead of sign-extending: valid DICOM (PS3.5 8.1.1), so compare the
        # BitsStored bits that carry the value.
        mask = (1 << src.BitsStored) - 1
        assert np.array_equal(
            pixels.astype(np.int32) & mask, src.pixel_array.astype(np.int32) & mask
        )


def test_cget_300_instances_keeps_rss_flat(compacs_node, tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 300, study_uid=study)
    res = compacs_node.store(files)
    assert peers.store_ok(res, files)
    wait_compressed(compacs_node, 300, timeout=600)
    node = psutil.Process(compacs_node.pid)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(node.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = tmp_path / "get"
    try:
        res = peers.getscu(compacs_node.port, "STUDY", {"StudyInstanceUID": study}, out)
    finally:
        done.set()
        sampler.join()
    assert res.returncode == 0
    assert len(list(out.iterdir())) == 300
    # Flat: the peak while sending 300 x 512 KiB (150 MiB) stays within 60 MiB of the
    # RSS after the first tenth; a node holding the study would grow by ~150 MiB.
    early = max(samples[: max(1, len(samples) // 10)])
    assert max(samples) - early < 60 * 2**20, (early, max(samples))
    got = pydicom.dcmread(next(out.iterdir()))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(got.pixel_array, dicomdata.ct_slice_pixels())


def test_damaged_blob_is_a_failed_suboperation_not_a_failed_get(
    compacs_node, tmp_path: Path
) -> None:
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 3, study_uid=study)
    store_all(compacs_node, files)
    wait_compressed(compacs_node, 3)
    blob = sorted((compacs_node.data_dir / "archive" / "hot").rglob("*.dcm"))[0]
    data = bytearray(blob.read_bytes())
    data[-50] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "get"
    res = peers.getscu(compacs_node.port, "STUDY", {"StudyInstanceUID": study}, out)
    assert len(by_sop(out)) == 2  # the other two still arrive
    assert "Received C-GET Response (Warning" in res.stdout, res.stdout[-2000:]  # 0xB000
    assert "Number of Completed Suboperations : 2" in res.stdout
    assert "Number of Failed Suboperations    : 1" in res.stdout
    assert "checksum mismatch" in compacs_node.log_text()


def test_cget_cancel_stops_early_and_association_keeps_working(
    compacs_node, tmp_path: Path
) -> None:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 40, study_uid=study)
    res = compacs_node.store(files)
    assert peers.store_ok(res, files)
    wait_compressed(compacs_node, 40)
    received: list[str] = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        compacs_node.host,
        compacs_node.port,
        ae_title=compacs_node.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    try:
        statuses = []
        for status, _ in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=7
        ):
            statuses.append(status.Status)
            if status.Status == 0xFF00 and len(statuses) == 1:
                cx = assoc._get_valid_context(StudyRootQueryRetrieveInformationModelGet, "", "scu")
                assoc.send_c_cancel(7, cx.context_id)
        assert statuses[-1] == 0xFE00, [hex(s) for s in statuses]
        assert 0 < len(received) < 40
        again = []
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            again.append(status.Status)
        assert again[-1] == 0x0000 and len(received) >= 40
    finally:
        assoc.release()


def test_a_big_object_is_retrieved_exactly(make_node, make_storescp, tmp_path: Path) -> None:
    """A 67 MB multi-frame object (spooled, compressed from its file, still over
    wire.STREAM_ABOVE as JPEG-LS): getscu taking JPEG-LS gets the stored bytes, getscu taking
    only uncompressed syntaxes the decoded frames, storescp by C-MOVE the stored bytes;
    pixel-exact each time."""
    from test_memory import big_multiframe, pixel_digest

    src, pixels = big_multiframe(tmp_path / "big.dcm", 128)
    storescp = make_storescp()
    node = make_node(f'[move_destinations]\nSTORESCP = "127.0.0.1:{storescp.port}"\n')
    assert peers.store_ok(node.store([src]), [src])
    stats = wait_compressed(node, 1)
    assert stats["by_codec"]["jpegls"]["instances"] == 1, stats
    (blob,) = (node.data_dir / "archive" / "hot").rglob("*.dcm")
    assert blob.stat().st_size > STREAM_ABOVE  # retrieved from the file, streamed
    study = {
        "StudyInstanceUID": str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)
    }
    for extra, syntax in (("+xt", JPEG_LS), ("", EXPLICIT_LE)):
        out = tmp_path / f"get{extra}"
        res = peers.getscu(node.port, "STUDY", study, out, extra=[extra] if extra else [])
        assert res.returncode == 0, res.stdout[-3000:]
        (got,) = [p for p in out.rglob("*") if p.is_file()]
        assert peers.transfer_syntax_of(got) == syntax
        assert pixel_digest(got) == pixels
    res = peers.movescu(node.port, "STUDY", study, "STORESCP")
    assert res.returncode == 0, res.stdout[-3000:]
    (moved,) = storescp.received()
    assert peers.transfer_syntax_of(moved) == JPEG_LS and pixel_digest(moved) == pixels
