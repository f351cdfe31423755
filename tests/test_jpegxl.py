"""JPEG XL lossless on real images, and the JPEG XL transfer syntaxes taught to pydicom 3.0.2.

tests/test_codecs.py runs the shared round trips (every real file, default effort 7) and the
format checks for this codec too; here: Part-10 files written and read back through pydicom
(dcmwrite, dcmread, encaps), what a DICOM reader that puts the decoded samples into Pixel Data
unchanged gets (the stored values, signed ones included), the codestream form, the effort
parameter, and the version guard of the UID registration.
"""

from __future__ import annotations

import functools
import logging
from io import BytesIO

import dicomdata
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

from compacs.codecs import pydicom_uids, registry
from compacs.codecs.base import PixelFormat

JXL = registry.get("jpegxl")


@functools.cache
def _source(name: str) -> tuple[pydicom.Dataset, PixelFormat, tuple[np.ndarray, ...]]:
    ds = pydicom.dcmread(dicomdata.testdata_path(name))
    return ds, PixelFormat.from_dataset(ds), dicomdata.frames_of(ds)


def _part10(ds: pydicom.Dataset, encoded: list[bytes]) -> bytes:
    out = ds.copy()
    out.file_meta = pydicom.Dataset(ds.file_meta)
    out.file_meta.TransferSyntaxUID = JXL.transfer_syntax_uid
    out.PixelData = encapsulate(encoded, has_bot=len(encoded) > 1)
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    if out.get("SamplesPerPixel", 1) > 1:
        out.PlanarConfiguration = 0
    buffer = BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("uid", sorted(pydicom_uids.JPEG_XL_ENTRIES))
def test_pydicom_knows_the_jpeg_xl_syntaxes(uid: str) -> None:
    name, _, _, _, keyword = pydicom_uids.JPEG_XL_ENTRIES[uid]
    ts = UID(uid)
    assert ts.is_transfer_syntax
    assert ts.is_compressed and ts.is_encapsulated
    assert not ts.is_implicit_VR and ts.is_little_endian
    assert ts.name == name and ts.keyword == keyword
    assert name.startswith("JPEG XL")


def test_registration_is_guarded_by_the_pydicom_version(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert pydicom_uids.register()  # idempotent: already done by importing the registry
    table = {k: v for k, v in pydicom_uids.UID_dictionary.items() if not k.endswith(".4.110")}
    monkeypatch.setattr(pydicom_uids, "UID_dictionary", table)
    monkeypatch.setattr(pydicom, "__version__", "3.0.9")
    with caplog.at_level(logging.WARNING, logger="compacs.codecs"):
        assert not pydicom_uids.register()
    assert "pydicom 3.0.9" in caplog.text and "3.0.2" in caplog.text
    assert "1.2.840.10008.1.2.4.110" not in table
    monkeypatch.setattr(pydicom, "__version__", pydicom_uids.TESTED_PYDICOM)
    assert pydicom_uids.register()
    assert table["1.2.840.10008.1.2.4.110"][4] == "JPEGXLLossless"


# (file, effort): the signed CT (14 of 16 bits, negative values), the 1024² MR, the 15-bit CR,
# RGB ultrasound, the 10-frame MR. Effort 3 keeps the large ones quick; test_codecs runs 7.
PART10_CASES = [
    ("693_UNCR.dcm", 7),
    ("MR2_J2KR.dcm", 3),
    ("RG1_UNCR.dcm", 3),
    ("US1_UNCR.dcm", 7),
    ("emri_small.dcm", 7),
]


@pytest.mark.parametrize(("name", "effort"), PART10_CASES)
def test_part10_files_round_trip_through_pydicom(name: str, effort: int) -> None:
    ds, fmt, frames = _source(name)
    encoded = [JXL.encode_frame(frame, fmt, effort=effort) for frame in frames]
    back = pydicom.dcmread(BytesIO(_part10(ds, encoded)))
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.110"
    assert back.file_meta.TransferSyntaxUID.name == "JPEG XL Lossless"
    items = list(generate_frames(back.PixelData, number_of_frames=fmt.number_of_frames))
    # Odd-length fragments get one padding byte (PS3.5 A.4): the decoder must take them so.
    assert items == [data + b"\0" * (len(data) % 2) for data in encoded]
    decoded = [JXL.decode_frame(item, PixelFormat.from_dataset(back)) for item in items]
    for got, want in zip(decoded, frames, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "mlut_18.dcm", "CT_small.dcm", "US1_UNCR.dcm"])
def test_a_reader_that_stores_the_decoded_samples_gets_the_stored_values(name: str) -> None:
    """Signed data is coded as its bit pattern: libjxl's unsigned output, put into native
    Pixel Data as it comes, reads back as the original signed values."""
    import imagecodecs

    ds, fmt, frames = _source(name)
    samples = imagecodecs.jpegxl_decode(JXL.encode_frame(frames[0], fmt))
    assert samples.dtype.kind == "u"
    native = ds.copy()
    native.file_meta = pydicom.Dataset(ds.file_meta)
    native.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    native.PixelData = samples.astype(fmt.dtype.str.replace("i", "u")).tobytes()
    native["PixelData"].VR = "OW" if fmt.bits_allocated > 8 else "OB"
    assert np.array_equal(native.pixel_array, frames[0])
    if fmt.signed:
        assert frames[0].min() < 0 or name == "CT_small.dcm"


@pytest.mark.parametrize("sign_extend", [True, False])
def test_signed_12_bit_ct_round_trips_whatever_its_high_bits(sign_extend: bool, tmp_path) -> None:
    """Real CT in HU, BitsStored 12 of 16, high bits sign-extended or zero as some scanners
    write them: the frame convention sign-extends both, and so must the decoder."""
    ds = pydicom.dcmread(dicomdata.signed_ct_12bit(tmp_path, sign_extend=sign_extend))
    fmt = PixelFormat.from_dataset(ds)
    frame = dicomdata.frames_of(ds)[0]
    assert frame.min() < 0
    decoded = JXL.decode_frame(JXL.encode_frame(frame, fmt), fmt)
    assert decoded.dtype == np.int16 and np.array_equal(decoded, frame)


def test_codestream_declares_bits_stored() -> None:
    """Up to 12 bits a bare codestream (FF0A); deeper data comes in libjxl's box container."""
    _, fmt12, frames12 = _source("emri_small.dcm")
    _, fmt14, frames14 = _source("693_UNCR.dcm")
    assert (fmt12.bits_stored, fmt14.bits_stored) == (12, 14)
    assert JXL.encode_frame(frames12[0], fmt12)[:2] == b"\xff\x0a"
    assert JXL.encode_frame(frames14[0], fmt14)[4:8] == b"JXL "


def test_effort_trades_speed_for_size_and_stays_lossless() -> None:
    _, fmt, frames = _source("693_UNCR.dcm")
    sizes = {}
    for effort in (1, 3, 7):
        data = JXL.encode_frame(frames[0], fmt, effort=effort)
        assert np.array_equal(JXL.decode_frame(data, fmt), frames[0])
        sizes[effort] = len(data)
    assert sizes[7] < sizes[3] < sizes[1]
    assert JXL.encode_frame(frames[0], fmt, effort="3") == JXL.encode_frame(
        frames[0], fmt, effort=3
    )


@pytest.mark.parametrize("bad", [0, 11, -1, 7.0, True, "7.5", "seven", None])
def test_bad_effort_names_the_parameter_and_the_range(bad: object) -> None:
    with pytest.raises(ValueError, match=r"jpegxl effort must be an integer from 1 to 10"):
        JXL.check_params({"effort": bad})
    with pytest.raises(ValueError, match="no parameter level"):
        JXL.check_params({"level": 3})
