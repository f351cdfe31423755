"""Codec round trips on real images, and proof that other DICOM decoders read what we write.

Frames come from pydicom's `iter_pixels(raw=True)` (the frame convention in codecs/base.py).
Each encoded frame must decode bit-exactly with our own decoder, with every pydicom decoder
plugin installed for its transfer syntax (pyjpegls/CharLS and pylibjpeg/libjpeg for JPEG-LS,
OpenJPEG for J2K and HTJ2K, pydicom and pylibjpeg-rle for RLE), and with DCMTK where it
has a decoder (dcmdjpls, dcmdrle).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import iter_pixels
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_j2k_parameters

from compacs.codecs import registry
from compacs.codecs.base import Codec, PixelFormat

# Real files: (name, what makes it interesting).
REAL_FILES = {
    "CT_small.dcm": "CT, signed 16/16",
    "MR_small.dcm": "MR, signed 16/16",
    "693_UNCR.dcm": "CT, signed 16/14, negative values",
    "mlut_18.dcm": "signed 16/12, values to -2048",
    "emri_small.dcm": "MR, 10 frames, 12 bits stored",
    "RG1_UNCR.dcm": "CR 1955x1841, 15 bits stored, MONOCHROME1",
    "RG3_UNCR.dcm": "CR 1760x1760, 10 bits stored",
    "MR2_J2KR.dcm": "MR 1024x1024, 12 bits, received as J2K lossless",
    "693_J2KR.dcm": "CT 512x512 signed 16/16, received as J2K lossless",
    "SC_rgb.dcm": "RGB 8-bit",
    "US1_UNCR.dcm": "US RGB 640x480",
    "SC_ybr_full_uncompressed.dcm": "YBR_FULL 8-bit, no colour conversion allowed",
    "SC_rgb_16bit.dcm": "RGB 16-bit",
    "SC_rgb_32bit.dcm": "RGB 32-bit (RLE only)",
}
# The learned codec has its own tests (tests/test_learned.py): a private syntax that no other
# decoder reads, and seconds per large image on a CPU.
FRAME_CODECS = [c for c in registry.all_codecs() if c.name not in ("passthrough", "learned")]


def _path(name: str) -> str:
    found = get_testdata_file(name, download=False)
    if not found:
        pytest.skip(f"{name} is in neither pydicom's test files nor pydicom-data")
    return str(found)


@functools.cache
def _source(name: str) -> tuple[PixelFormat, tuple[np.ndarray, ...]]:
    ds = pydicom.dcmread(_path(name))
    return PixelFormat.from_dataset(ds), tuple(iter_pixels(ds, raw=True))


@functools.cache
def _encoded(codec_name: str, name: str) -> tuple[bytes, ...]:
    codec = registry.get(codec_name)
    fmt, frames = _source(name)
    return tuple(codec.encode_frame(frame, fmt) for frame in frames)


def _supported(codec: Codec, name: str) -> PixelFormat:
    if not codec.is_available():
        pytest.skip(f"{codec.name} not available")
    fmt, _ = _source(name)
    reason = codec.unsupported_reason(fmt)
    if reason:
        pytest.skip(f"{codec.name} does not take {name}: {reason}")
    return fmt


def _dataset(codec: Codec, name: str) -> Dataset:
    """The real file with its Pixel Data replaced by our encapsulated frames."""
    ds = pydicom.dcmread(_path(name))
    ds.PixelData = encapsulate(list(_encoded(codec.name, name)))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = codec.transfer_syntax_uid
    if ds.get("SamplesPerPixel", 1) > 1:
        ds.PlanarConfiguration = 0
    return ds


def _pydicom_plugins(uid: str) -> list[str]:
    """pydicom's available decoder plugins for `uid` (none for a syntax it has no decoder for)."""
    try:
        return list(get_decoder(uid).available_plugins)
    except NotImplementedError:
        return []


def _assert_same_frames(got: list[np.ndarray], want: tuple[np.ndarray, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        assert np.array_equal(g, w)


@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.parametrize("codec", FRAME_CODECS, ids=lambda c: c.name)
def test_roundtrip_is_bit_exact(codec: Codec, name: str) -> None:
    fmt = _supported(codec, name)
    _, frames = _source(name)
    decoded = [codec.decode_frame(data, fmt) for data in _encoded(codec.name, name)]
    _assert_same_frames(decoded, frames)


@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.parametrize("codec", FRAME_CODECS, ids=lambda c: c.name)
def test_pydicom_decoders_read_what_we_write(codec: Codec, name: str) -> None:
    fmt = _supported(codec, name)
    _, frames = _source(name)
    ds = _dataset(codec, name)
    plugins = _pydicom_plugins(codec.transfer_syntax_uid)
    if not plugins and codec.name == "jpegxl":
        pytest.skip("pydicom 3.0.2 has no JPEG XL decoder (tests/test_jpegxl.py reads the files)")
    assert plugins, f"pydicom has no decoder for {codec.transfer_syntax_uid}"
    for plugin in plugins:
        if plugin == "pillow" and fmt.bits_allocated > 8 and fmt.samples_per_pixel > 1:
            continue  # pydicom refuses it: "Pillow cannot decode 16-bit multi-sample data"
        got = list(iter_pixels(ds, raw=True, decoding_plugin=plugin))
        _assert_same_frames(got, frames)


@pytest.mark.parametrize(
    ("name", "codec_name"),
    [
        ("emri_small_jpeg_ls_lossless.dcm", "jpegls"),
        ("MR_small_jpeg_ls_lossless.dcm", "jpegls"),
        ("MR2_J2KR.dcm", "j2k"),
        ("693_J2KR.dcm", "j2k"),
        ("J2K_pixelrep_mismatch.dcm", "j2k"),
        ("emri_small_RLE.dcm", "rle"),
        ("MR_small_RLE.dcm", "rle"),
    ],
)
def test_we_decode_what_others_wrote(name: str, codec_name: str) -> None:
    """Frames encoded by other software decode like pydicom decodes them (sign rules too)."""
    codec = registry.get(codec_name)
    ds = pydicom.dcmread(_path(name))
    assert ds.file_meta.TransferSyntaxUID == codec.transfer_syntax_uid
    fmt = PixelFormat.from_dataset(ds)
    want = tuple(iter_pixels(ds, raw=True))
    items = generate_frames(ds.PixelData, number_of_frames=fmt.number_of_frames)
    _assert_same_frames([codec.decode_frame(item, fmt) for item in items], want)


# --- codestream headers ---------------------------------------------------------------


def _marker(data: bytes, marker: bytes) -> int:
    index = data.find(marker)
    assert index >= 0, f"no {marker.hex()} marker"
    return index


@pytest.mark.parametrize("name", ["emri_small.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm"])
def test_jpegls_precision_is_bits_stored_and_no_spiff(name: str) -> None:
    fmt, _ = _source(name)
    data = _encoded("jpegls", name)[0]
    assert data[:4] == b"\xff\xd8\xff\xf7"  # SOI then SOF55 at once: no SPIFF/APP8 header
    sof = _marker(data, b"\xff\xf7")
    assert data[sof + 4] == fmt.bits_stored  # P follows the 2-byte length
    assert fmt.bits_stored in (12, 10, 14)


def test_jpegls_colour_is_sample_interleaved() -> None:
    data = _encoded("jpegls", "US1_UNCR.dcm")[0]
    sos = _marker(data, b"\xff\xda")
    components = data[sos + 4]
    assert components == 3
    assert data[sos + 5 + 2 * components + 1] == 2  # ILV after NEAR


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "emri_small.dcm"])
def test_j2k_siz_carries_bits_stored_and_sign(name: str) -> None:
    fmt, _ = _source(name)
    data = _encoded("j2k", name)[0]
    assert data[:4] == b"\xff\x4f\xff\x51"  # raw codestream, not JP2
    assert get_j2k_parameters(data) == {
        "precision": fmt.bits_stored,
        "is_signed": fmt.signed,
        "jp2": False,
    }


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "emri_small.dcm"])
def test_htj2k_is_a_raw_ht_codestream_with_the_right_sign(name: str) -> None:
    fmt, _ = _source(name)
    data = _encoded("htj2k", name)[0]
    assert data[:4] == b"\xff\x4f\xff\x51"
    _marker(data[:200], b"\xff\x50")  # CAP: Part 15 (HT) capabilities
    params = get_j2k_parameters(data)
    assert params["is_signed"] == fmt.signed
    assert params["precision"] == fmt.bits_allocated  # imagecodecs: container, see htj2k.py


@pytest.mark.parametrize("codec_name", ["j2k", "htj2k"])
def test_j2k_colour_has_no_component_transform(codec_name: str) -> None:
    """With RCT the object would have to say YBR_RCT; we keep RGB, so MCT must be off."""
    data = _encoded(codec_name, "US1_UNCR.dcm")[0]
    cod = _marker(data, b"\xff\x52")
    assert data[cod + 8] == 0  # Lcod(2) Scod(1) progression(1) layers(2) then MCT


# --- DCMTK ----------------------------------------------------------------------------

DCMTK_CASES = [
    ("jpegls", "dcmdjpls", "CT_small.dcm"),
    ("jpegls", "dcmdjpls", "693_UNCR.dcm"),
    ("jpegls", "dcmdjpls", "mlut_18.dcm"),
    ("jpegls", "dcmdjpls", "emri_small.dcm"),
    ("jpegls", "dcmdjpls", "MR2_J2KR.dcm"),
    ("jpegls", "dcmdjpls", "US1_UNCR.dcm"),
    ("rle", "dcmdrle", "693_UNCR.dcm"),
    ("rle", "dcmdrle", "emri_small.dcm"),
    ("rle", "dcmdrle", "US1_UNCR.dcm"),
]


@pytest.mark.parametrize(("codec_name", "tool", "name"), DCMTK_CASES)
def test_dcmtk_decodes_what_we_write(
    codec_name: str, tool: str, name: str, tmp_path: Path, debian_peers: None
) -> None:
    codec = registry.get(codec_name)
    _supported(codec, name)
    _, frames = _source(name)
    encoded, decoded = tmp_path / "encoded.dcm", tmp_path / "decoded.dcm"
    _dataset(codec, name).save_as(encoded, enforce_file_format=True)
    result = subprocess.run(
        [tool, str(encoded), str(decoded)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = pydicom.dcmread(decoded)
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    _assert_same_frames(list(iter_pixels(out, raw=True)), frames)


# --- what codecs refuse, and the registry ---------------------------------------------


def _fmt(**changes: object) -> PixelFormat:
    base = dict(
        rows=64,
        columns=64,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
    )
    return PixelFormat(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", FRAME_CODECS, ids=lambda c: c.name)
def test_unsupported_reasons(codec: Codec) -> None:
    assert codec.unsupported_reason(_fmt()) is None
    assert "SamplesPerPixel 4" in (codec.unsupported_reason(_fmt(samples_per_pixel=4)) or "")
    ybr422 = _fmt(
        samples_per_pixel=3,
        bits_allocated=8,
        bits_stored=8,
        photometric_interpretation="YBR_FULL_422",
    )
    assert "YBR_FULL_422" in (codec.unsupported_reason(ybr422) or "")
    signed_rgb = _fmt(samples_per_pixel=3, pixel_representation=1, photometric_interpretation="RGB")
    assert "signed colour" in (codec.unsupported_reason(signed_rgb) or "")
    assert "BitsStored 17" in (codec.unsupported_reason(_fmt(bits_stored=17)) or "")
    reason_32 = codec.unsupported_reason(_fmt(bits_allocated=32, bits_stored=32))
    if codec.name == "rle":
        assert reason_32 is None
        assert "BitsAllocated 64" in (codec.unsupported_reason(_fmt(bits_allocated=64)) or "")
    else:
        assert "BitsAllocated 32" in (reason_32 or "")


def test_passthrough_takes_everything_and_never_codes() -> None:
    codec = registry.get("passthrough")
    assert codec.transfer_syntax_uid == ""
    assert codec.lossless and codec.is_available()
    assert codec.unsupported_reason(_fmt(bits_allocated=32, samples_per_pixel=4)) is None
    with pytest.raises(NotImplementedError):
        codec.encode_frame(np.zeros((2, 2), np.uint16), _fmt(rows=2, columns=2))
    with pytest.raises(NotImplementedError):
        codec.decode_frame(b"", _fmt())


def test_registry() -> None:
    names = ["jpegls", "j2k", "htj2k", "jpegxl", "rle", "learned", "passthrough"]
    assert registry.names() == names
    assert [c.name for c in registry.all_codecs()] == registry.names()
    assert registry.get("jpegls") is registry.get("jpegls")
    with pytest.raises(KeyError, match=f"known: {', '.join(names)}"):
        registry.get("jpeg-ls")
    assert registry.by_transfer_syntax("1.2.840.10008.1.2.4.80") is registry.get("jpegls")
    assert registry.by_transfer_syntax("1.2.840.10008.1.2.4.201") is registry.get("htj2k")
    assert registry.by_transfer_syntax("1.2.840.10008.1.2.5") is registry.get("rle")
    assert registry.by_transfer_syntax("1.2.840.10008.1.2.4.110") is registry.get("jpegxl")
    assert registry.by_transfer_syntax("1.2.840.10008.1.2.1") is None
    assert registry.by_transfer_syntax("") is None
    for codec in registry.all_codecs():
        assert codec.is_available(), codec.name


def test_params_are_checked() -> None:
    jpegls = registry.get("jpegls")
    jpegls.check_params({"interleave_mode": 0})
    with pytest.raises(ValueError, match="interleave_mode"):
        jpegls.check_params({"interleave_mode": 3})
    with pytest.raises(ValueError, match="no parameter effort"):
        registry.get("j2k").check_params({"effort": 7})


@pytest.mark.parametrize("ilv", [0, 1, 2])
def test_jpegls_every_interleave_mode_round_trips(ilv: int) -> None:
    fmt, frames = _source("US1_UNCR.dcm")
    codec = registry.get("jpegls")
    data = codec.encode_frame(frames[0], fmt, interleave_mode=ilv)
    _assert_same_frames([codec.decode_frame(data, fmt)], frames[:1])


@functools.cache
def _eight_bits_in_sixteen() -> tuple[Dataset, PixelFormat, tuple[np.ndarray, ...]]:
    """emri_small's real frames halved to fit BitsStored 8 in BitsAllocated 16."""
    ds = pydicom.dcmread(_path("emri_small.dcm"))
    frames = tuple(frame >> 1 for frame in iter_pixels(ds, raw=True))
    assert max(int(f.max()) for f in frames) < 256
    ds.BitsStored, ds.HighBit = 8, 7
    return ds, PixelFormat.from_dataset(ds), frames


@pytest.mark.parametrize("codec", FRAME_CODECS, ids=lambda c: c.name)
def test_eight_bits_stored_in_sixteen_allocated(codec: Codec) -> None:
    source, fmt, frames = _eight_bits_in_sixteen()
    reason = codec.unsupported_reason(fmt)
    if codec.name == "jpegls":
        assert reason and "DCMTK" in reason
        return
    assert reason is None
    encoded = [codec.encode_frame(frame, fmt) for frame in frames]
    _assert_same_frames([codec.decode_frame(data, fmt) for data in encoded], frames)
    ds = source.copy()
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = codec.transfer_syntax_uid
    for plugin in _pydicom_plugins(codec.transfer_syntax_uid):
        got = list(iter_pixels(ds, raw=True, decoding_plugin=plugin))
        # pydicom sizes J2K output by the codestream precision: uint8 here, same values.
        assert all(np.array_equal(g, f) for g, f in zip(got, frames, strict=True))
