"""Volume codecs (HEVC lossless over x265) on real volumes: bit-exact round trips, one frame
decoded from the middle of a volume on its own, why a volume does not qualify, the container's
checks, and the x265 bug that verification exists for.

Real volumes: the 20-slice TotalSegmentator CT series (512², unsigned 12 of 16 bits), the
TotalSegmentator MR volume (20 × 91 × 117, signed, resampled NIfTI: the only MR series the
registries carry), pydicom's 10-frame enhanced MR (64²), the first frames of pydicom's 120-frame
ultrasound cine (480 × 640, decoded from JPEG baseline: YBR_FULL samples), an RGB ultrasound
frame, and a real CT slice in signed 12-bit HU.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import dicomdata
import numpy as np
import pydicom
import pytest

from compacs.codecs import hevc, registry
from compacs.codecs.base import PixelFormat
from compacs.codecs.volume import VolumeMismatch, encode_verified, read_header

HEVC = registry.get_volume("hevc")
ct_series = functools.cache(dicomdata.ct_series_volume)
mr_series = functools.cache(dicomdata.mr_series_volume)
pydicom_volume = functools.cache(dicomdata.pydicom_volume)


def signed_ct(tmp: Path) -> dicomdata.Volume:
    ds = pydicom.dcmread(dicomdata.signed_ct_12bit(tmp))
    return PixelFormat.from_dataset(ds), dicomdata.frames_of(ds)


@functools.cache
def encoded_ct(gop_size: int = 8) -> bytes:
    fmt, frames = ct_series()
    return encode_verified(HEVC, frames, fmt, gop_size=gop_size)


def _assert_same(got: list[np.ndarray], want: tuple[np.ndarray, ...] | list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w)


# (name, loader, coded bit depth): CT and MR series, multi-frame MR, cine, RGB.
CASES = {
    "ct-series-12bit": (ct_series, 12),
    "mr-series-signed": (mr_series, 10),
    "multiframe-mr-64x64": (lambda: pydicom_volume("emri_small.dcm"), 10),
    "us-cine-ybr": (lambda: pydicom_volume("color3d_jpeg_baseline.dcm", 12), 8),
    "us-rgb-one-frame": (lambda: pydicom_volume("US1_UNCR.dcm"), 8),
}


@pytest.mark.parametrize("case", CASES)
def test_volumes_round_trip_bit_exact(case: str) -> None:
    load, coded_bits = CASES[case]
    fmt, frames = load()
    data = encode_verified(HEVC, frames, fmt)
    header = read_header(data)
    assert (header.codec, header.frames, header.coded_bits) == ("hevc", len(frames), coded_bits)
    assert header.offset == min(int(f.min()) for f in frames)
    assert HEVC.frame_count(data) == len(frames)
    _assert_same(HEVC.decode_frames(data, fmt), frames)
    assert len(data) < sum(f.nbytes for f in frames)
    # RGB goes through the reversible colour transform, everything else is coded as stored.
    transform = hevc.RCT if fmt.photometric_interpretation == "RGB" else hevc.AS_STORED
    assert all(header.group_bytes(data, g)[0] == transform for g in range(header.groups))


def test_signed_ct_with_negative_values_is_coded_after_the_offset(tmp_path: Path) -> None:
    fmt, frames = signed_ct(tmp_path)
    assert fmt.signed and fmt.bits_stored == 12 and frames[0].min() < 0
    data = encode_verified(HEVC, frames, fmt)
    assert read_header(data).offset == int(frames[0].min())
    _assert_same(HEVC.decode_frames(data, fmt), frames)


def test_one_slice_from_the_middle_decodes_its_group_alone(monkeypatch) -> None:
    fmt, frames = ct_series()
    data = encoded_ct(8)
    header = read_header(data)
    assert header.groups == 3 and header.gop_size == 8
    decoded: list[int] = []
    original = HEVC.decode_group

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(HEVC, "decode_group", counting)
    _assert_same(HEVC.decode_frames(data, fmt, [10]), [frames[10]])
    assert decoded == [8]  # frames 8..15: at most gop_size frames for one slice

    # The other groups' bytes play no part: wipe them, and slice 10 still decodes.
    wiped = bytearray(data)
    for group in (0, 2):
        start, end = header.group_span(group)
        wiped[start:end] = bytes(end - start)
    _assert_same(HEVC.decode_frames(bytes(wiped), fmt, [10]), [frames[10]])
    try:  # ... while a slice of a wiped group does not
        got = HEVC.decode_frames(bytes(wiped), fmt, [2])
    except ValueError:
        pass  # the decoder found no frames in the zeros
    else:
        assert not np.array_equal(got[0], frames[2])


def test_a_whole_volume_decodes_each_group_once(monkeypatch) -> None:
    fmt, frames = ct_series()
    data = encoded_ct(8)
    calls: list[int] = []
    original = HEVC.decode_group
    monkeypatch.setattr(HEVC, "decode_group", lambda *a, **k: calls.append(1) or original(*a, **k))
    _assert_same(HEVC.decode_frames(data, fmt), frames)
    assert len(calls) == 3
    calls.clear()
    _assert_same(HEVC.decode_frames(data, fmt, [19, 3, 4, 19]), [frames[i] for i in (19, 3, 4, 19)])
    assert len(calls) == 2


def test_gop_size_sets_the_random_access_points_and_costs_ratio() -> None:
    fmt, frames = ct_series()
    whole = encode_verified(HEVC, frames[:6], fmt, gop_size=6)
    intra = encode_verified(HEVC, frames[:6], fmt, gop_size=1)
    assert (read_header(whole).groups, read_header(intra).groups) == (1, 6)
    assert len(whole) < len(intra)  # prediction between slices is what a volume buys
    _assert_same(HEVC.decode_frames(intra, fmt, [5]), [frames[5]])


def test_why_a_volume_does_not_qualify(tmp_path: Path) -> None:
    fmt, frames = pydicom_volume("693_UNCR.dcm")  # signed CT, -2000..2492
    reason = HEVC.data_unsupported_reason(frames, fmt)
    assert reason == (
        "value span -2000..2492 needs 13 bits; hevc codes 8, 10, 12 bits "
        "(after subtracting the volume's minimum)"
    )
    with pytest.raises(ValueError, match="hevc cannot code this volume: value span -2000"):
        HEVC.encode_volume(frames, fmt)
    cr_fmt, cr = pydicom_volume("RG1_UNCR.dcm")  # 15-bit CR, 874..26479
    assert "needs 15 bits" in (HEVC.data_unsupported_reason(cr, cr_fmt) or "")

    ct_fmt, ct = ct_series()
    other = (*ct[:3], pydicom_volume("CT_small.dcm")[1][0])
    assert HEVC.data_unsupported_reason(other, ct_fmt) == (
        "frame 3 is int16 (128, 128), not uint16 (512, 512) like the volume"
    )
    assert HEVC.data_unsupported_reason((), ct_fmt) == "no frames"
    assert HEVC.data_unsupported_reason(ct, ct_fmt) is None
    wide = dataclasses.replace(ct_fmt, bits_allocated=32, bits_stored=32)
    assert HEVC.unsupported_reason(wide) == "BitsAllocated 32 (supports 8, 16)"
    ybr422 = dataclasses.replace(
        ct_fmt, samples_per_pixel=3, bits_stored=8, photometric_interpretation="YBR_FULL_422"
    )
    assert "YBR_FULL_422" in (HEVC.unsupported_reason(ybr422) or "")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gop_size": 0}, "hevc gop_size must be an integer from 1 to 1024, not 0"),
        ({"gop_size": "8.5"}, "hevc gop_size must be an integer from 1 to 1024"),
        ({"gop_size": 2000}, "from 1 to 1024, not 2000"),
        ({"preset": "turbo"}, "hevc preset must be one of ultrafast, superfast, .* not 'turbo'"),
        ({"effort": 7}, "codec 'hevc' has no parameter effort \\(allowed: gop_size, preset\\)"),
    ],
)
def test_bad_params_name_the_parameter_and_the_allowed_values(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HEVC.check_params(params)
    fmt, frames = pydicom_volume("emri_small.dcm")
    with pytest.raises(ValueError, match=message):
        HEVC.encode_volume(frames, fmt, **params)


def test_the_container_checks_what_it_is_given() -> None:
    fmt, frames = pydicom_volume("emri_small.dcm")
    data = encode_verified(HEVC, frames, fmt, gop_size="4", preset="ultrafast")
    assert read_header(data).groups == 3
    with pytest.raises(ValueError, match="does not match"):
        HEVC.decode_frames(data, dataclasses.replace(fmt, rows=32))
    with pytest.raises(ValueError, match="not a compacs volume"):
        HEVC.decode_frames(b"\x00" * 64, fmt)
    with pytest.raises(ValueError, match="inconsistent with the blob's length"):
        HEVC.decode_frames(data[: len(data) - 10], fmt)
    with pytest.raises(ValueError, match="written by codec 'other'"):
        HEVC.decode_frames(data[:5] + b"other\0\0\0" + data[13:], fmt)
    with pytest.raises(IndexError, match="frame 10 is outside this 10-frame volume"):
        HEVC.decode_frames(data, fmt, [10])


def test_verification_catches_x265_getting_64_wide_frames_wrong(monkeypatch) -> None:
    """A real x265 bug, found on emri_small: P/B frames exactly 64 (or 16, 32) pixels wide
    decode with wrong samples near the right edge, differently from run to run. The codec pads
    such frames; without the padding, `encode_verified` must refuse the result."""
    fmt, frames = pydicom_volume("emri_small.dcm")
    assert fmt.columns == 64 and hevc.coded_size(fmt.rows, fmt.columns) == (64, 72)
    for _ in range(5):
        _assert_same(HEVC.decode_frames(encode_verified(HEVC, frames, fmt), fmt), frames)

    monkeypatch.setattr(hevc, "coded_size", lambda rows, columns: (rows, columns))
    mismatches = 0
    for _ in range(5):  # 20 runs of 20 mismatched here; retries keep one lucky run from passing
        try:
            encode_verified(HEVC, frames, fmt)
        except VolumeMismatch as exc:
            assert "does not decode bit-exact" in str(exc)
            mismatches += 1
            break
    if not mismatches:  # x265 errs differently from run to run: another machine may be lucky
        pytest.skip("x265 coded 64-wide frames exactly 5 times here: nothing to catch")


def test_volume_registry() -> None:
    assert registry.volume_names() == ["hevc", "learnvol"]
    assert HEVC.transfer_syntax_uid == "2.25.38871254023385371384039355074665861377"
    assert HEVC.is_available() and HEVC.lossless
    with pytest.raises(KeyError, match="unknown volume codec 'h265' \\(known: hevc, learnvol\\)"):
        registry.get_volume("h265")
    assert "hevc" not in registry.names()  # frame codecs and volume codecs are driven apart
