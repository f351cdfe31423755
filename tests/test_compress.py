"""The verified runner (invariant 2): a codec whose output does not decode bit-exact is
never stored; the next codec of the rule is tried, and finally the object as received."""

from __future__ import annotations

from io import BytesIO

import dicomdata
import numpy as np
import pydicom
import pytest

from compacs.codecs import registry
from compacs.service.compress import compress
from compacs.service.rules import CodecChoice


@pytest.fixture
def ct_raw(tmp_path) -> tuple[bytes, pydicom.Dataset]:
    raw = dicomdata.ct_series(tmp_path, 1)[0].read_bytes()
    return raw, pydicom.dcmread(BytesIO(raw))


def off_by_one(decode):
    """A decoder with a one-value error in one pixel: what a buggy codec build would do."""

    def broken(data, fmt):
        frame = decode(data, fmt).copy()
        frame[100, 100] += 1
        return frame

    return broken


def test_mismatch_falls_back_to_next_codec(ct_raw, monkeypatch) -> None:
    raw, ds = ct_raw
    jpegls = registry.get("jpegls")
    monkeypatch.setattr(jpegls, "decode_frame", off_by_one(jpegls.decode_frame))
    outcome = compress(raw, ds, [CodecChoice("jpegls"), CodecChoice("j2k")])
    assert outcome.codec == "j2k" and outcome.fallbacks == 1
    assert any(
        "jpegls failed: ValueError: frame 0 does not decode bit-exact" in n for n in outcome.notes
    )
    stored = pydicom.dcmread(BytesIO(outcome.data))
    assert stored.file_meta.TransferSyntaxUID == registry.get("j2k").transfer_syntax_uid
    assert np.array_equal(stored.pixel_array, ds.pixel_array)


def test_every_codec_failing_stores_as_received(ct_raw, monkeypatch) -> None:
    raw, ds = ct_raw
    for name in ("jpegls", "rle"):
        codec = registry.get(name)
        monkeypatch.setattr(codec, "decode_frame", off_by_one(codec.decode_frame))
    outcome = compress(raw, ds, [CodecChoice("jpegls"), CodecChoice("rle")])
    assert outcome.codec == "passthrough" and outcome.fallbacks == 2
    assert outcome.data == raw  # byte for byte what arrived


def test_encoder_exception_falls_back(ct_raw, monkeypatch) -> None:
    raw, ds = ct_raw

    def explode(frame, fmt, **params):
        raise RuntimeError("CharLS error")

    monkeypatch.setattr(registry.get("jpegls"), "encode_frame", explode)
    outcome = compress(raw, ds, [CodecChoice("jpegls"), CodecChoice("rle")])
    assert (
        outcome.codec == "rle" and "jpegls failed: RuntimeError: CharLS error" in outcome.notes[0]
    )


def test_explicit_le_arrival_is_spliced_byte_for_byte(ct_raw) -> None:
    """Everything but the file meta and Pixel Data stays exactly as received."""
    from compacs.service.compress import raw_layout

    raw, ds = ct_raw
    layout = raw_layout(raw, ds)
    assert layout is not None
    outcome = compress(raw, ds, [CodecChoice("jpegls")])
    out = pydicom.dcmread(BytesIO(outcome.data))
    kept = raw[layout.dataset_start : layout.pixel_header]
    assert kept in outcome.data  # the received elements, untouched
    assert np.array_equal(out.pixel_array, pydicom.dcmread(BytesIO(raw)).pixel_array)


def test_implicit_vr_arrival_is_reserialised_and_exact(samples) -> None:
    raw = samples["implicit"].read_bytes()
    ds = pydicom.dcmread(BytesIO(raw))
    from compacs.service.compress import raw_layout

    assert raw_layout(raw, ds) is None  # implicit VR cannot be spliced into explicit
    outcome = compress(raw, ds, [CodecChoice("jpegls")])
    out = pydicom.dcmread(BytesIO(outcome.data))
    assert outcome.codec == "jpegls"
    assert np.array_equal(out.pixel_array, pydicom.dcmread(BytesIO(raw)).pixel_array)
    assert out.PatientName == ds.PatientName and out.SOPInstanceUID == ds.SOPInstanceUID


def test_the_source_dataset_is_left_as_received(ct_raw) -> None:
    """pydicom 3.0's Dataset(ds) shares ds's elements: the runner's copy must not, or a codec
    that is tried and not kept leaves the source in its syntax for the next one."""
    raw, ds = ct_raw
    syntax, pixels = str(ds.file_meta.TransferSyntaxUID), ds.PixelData
    outcome = compress(raw, ds, [CodecChoice("jpegls")])
    assert outcome.codec == "jpegls"
    assert str(ds.file_meta.TransferSyntaxUID) == syntax and ds.PixelData == pixels
