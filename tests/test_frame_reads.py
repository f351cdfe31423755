"""A web viewer's frame reads without a parse of each object: the fragments found from their
item headers (web/domain.py `_trailing_frames`), the rows of a series kept a few seconds
(web/series_rows.py), and the one thing those must never do: label bytes with a syntax they
are not in, when the row read a moment ago predates a compression.

In-process: the real index (SQLite), archive and codecs, compression stepped by the test
(test_jobs' StepExecutor), so the order of events is the test's, not a race.
"""

from __future__ import annotations

import dataclasses
from io import BytesIO

import dicomdata
import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from sqlalchemy import update
from test_jobs import make_service, receive

from compacs.codecs.base import PixelFormat
from compacs.service.part10_scan import pixel_format, trailing_frames
from compacs.service.storage.index import Blob
from compacs.service.web.domain import Domain
from compacs.service.web.series_rows import SeriesRows

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def test_fragments_from_item_headers_match_pydicom(tmp_path) -> None:
    path = dicomdata.fresh_copy("emri_small_jpeg_ls_lossless.dcm", tmp_path)
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    count = int(ds.NumberOfFrames)
    expected = list(generate_frames(ds.PixelData, number_of_frames=count))
    assert [bytes(f) for f in trailing_frames(raw, count)] == expected
    assert trailing_frames(raw, count + 1) is None  # not one fragment per frame: parse
    # anything after the pixel data (here trailing padding): parse, do not guess
    assert (
        trailing_frames(raw + b"\xfc\xff\xfc\xffOB\x00\x00\x02\x00\x00\x00\x00\x00", count) is None
    )
    assert trailing_frames(raw[:-3], count) is None  # cut short
    (native,) = dicomdata.ct_series(tmp_path / "ct", 1)
    assert trailing_frames(native.read_bytes(), 1) is None


def test_the_pixel_module_walked_from_element_headers_is_pydicom_s(samples) -> None:
    """On every sample the walk reads (explicit VR little endian, sequences included) it
    finds what pydicom finds; on the others (implicit VR, big endian, deflated) it answers
    None rather than a guess."""
    walked = set()
    for key, path in samples.items():
        raw = path.read_bytes()
        ds = pydicom.dcmread(path)
        fmt = pixel_format(raw)
        if str(ds.file_meta.TransferSyntaxUID) in (
            "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
        ):  # fmt: skip
            assert fmt is None, key
            continue
        if fmt is not None:
            walked.add(key)
            assert fmt == PixelFormat.from_dataset(ds), key
    assert {"ct", "multiframe", "jpeg_ls", "j2k", "rle", "rgb"} <= walked, walked


def test_series_rows_are_read_once_kept_briefly_and_bounded() -> None:
    loads: list[str] = []

    @dataclasses.dataclass
    class Row:
        sop_instance_uid: str

    def load(series: str) -> list:
        loads.append(series)
        return [Row(f"{series}.{i}") for i in range(3)]

    rows = SeriesRows(load, keep_seconds=60, keep_series=2)
    assert rows.get("1", "1.0").sop_instance_uid == "1.0"
    assert rows.get("1", "1.2") is not None and rows.get("1", "9.9") is None
    assert loads == ["1"]  # one read for the series
    rows.get("2", "2.0")
    rows.get("3", "3.0")  # the third series pushes out the least recently used
    rows.get("1", "1.0")
    assert loads == ["1", "2", "3", "1"]
    stale = SeriesRows(load, keep_seconds=0)
    stale.get("4", "4.0")
    stale.get("4", "4.0")
    assert loads[-2:] == ["4", "4"]  # past keep_seconds: read again


@pytest.fixture
def stepped(tmp_path):  # noqa: ANN001, ANN201 - (service, steps, domain, first, second)
    """A service with two CT slices of one series received (compression waits for the
    test's steps), its web Domain, and the two data sets as sent."""
    service, steps = make_service(tmp_path)
    files = dicomdata.ct_series(tmp_path / "ct", 2)
    for path in files:
        assert receive(service, path.read_bytes()) == 0
    first, second = (pydicom.dcmread(p) for p in files)
    yield service, steps, Domain(service), first, second
    service.close()


def test_a_row_read_before_compression_never_mislabels_the_new_bytes(stepped) -> None:
    service, steps, domain, first, second = stepped
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    rows = {
        str(ds.SOPInstanceUID): domain.instance(study, series, str(ds.SOPInstanceUID))
        for ds in (first, second)
    }  # both rows read now, as received (pending, uncompressed)
    assert {r.stored_transfer_syntax for r in rows.values()} == {EXPLICIT_LE}
    steps.run_one()
    steps.run_one()  # both compressed since; the received blobs released, still on disk
    pixels = dicomdata.ct_slice_pixels()

    # the released file is still there: its bytes are in the syntax the old row names
    old = rows[str(first.SOPInstanceUID)]
    (frame,) = domain.stored_frames(old, [1], EXPLICIT_LE)
    assert np.array_equal(np.frombuffer(frame, pixels.dtype).reshape(pixels.shape), pixels)

    # swept: the node reads the new row and file, which are JPEG-LS, not what was asked
    with service.index.writing() as s:
        s.execute(update(Blob).values(released_at=Blob.created_at))
    service.config.storage = dataclasses.replace(service.config.storage, delete_grace_seconds=0)
    assert service.sweep() == 2
    old = rows[str(second.SOPInstanceUID)]
    assert domain.stored_frames(old, [1], EXPLICIT_LE) is None  # never JPEG-LS called native
    obj = domain.read(old)
    assert obj.syntax == JPEG_LS
    assert np.array_equal(pydicom.dcmread(BytesIO(obj.raw)).pixel_array, pixels)
    # and a fresh row cuts the JPEG-LS fragment from the item headers
    fresh = service.index.instance_by_uid(str(second.SOPInstanceUID))
    (cut,) = domain.stored_frames(fresh, [1], JPEG_LS)
    (expected,) = generate_frames(pydicom.dcmread(BytesIO(obj.raw)).PixelData, number_of_frames=1)
    assert bytes(cut) == expected


def test_frames_read_mark_their_instances_accessed_off_the_request(stepped) -> None:
    """The access marks a frame read leaves (tiers with since = "accessed") are written in
    a thread of their own when due, and the rest when the web face stops."""
    service, _, domain, first, second = stepped
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    domain._marked_at -= 60  # the last batch long ago: this read's mark is due now
    domain.instance(study, series, str(first.SOPInstanceUID))
    domain.instance(study, series, str(second.SOPInstanceUID))  # within the period: held
    assert domain._flusher is not None
    domain._flusher.join(timeout=30)
    marked = {i.sop_instance_uid for i in service.index.instances() if i.accessed_at}
    assert str(first.SOPInstanceUID) in marked  # the second too if it came before the write
    domain.stop()
    marked = {i.sop_instance_uid for i in service.index.instances() if i.accessed_at}
    assert marked == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
