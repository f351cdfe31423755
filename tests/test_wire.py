"""Retrieval's fast path: stored objects spliced for the wire (service/wire.py) and framed
into PDUs (service/bulk_store.py), checked against the slow path they replace.

The end-to-end checks (getscu and movescu pixel-exact, JPEG-LS pass-through byte for byte,
Orthanc decoding what it C-MOVEs) are in test_retrieve.py; these pin the pieces so a
failure there points here.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from compacs.codecs import registry
from compacs.service import wire
from compacs.service.compress import encoded_dataset, part10, source_frames
from compacs.service.dimse.pdu_runs import frame
from compacs.service.dimse.wire_instance import WireInstance
from compacs.service.transcode import transcode_dataset

JPEG_LS = "1.2.840.10008.1.2.4.80"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def stored_jpeg_ls(path: Path) -> bytes:
    """The blob compacs stores for `path` under the default rules (verified JPEG-LS)."""
    ds = pydicom.dcmread(path)
    return part10(encoded_dataset(ds, registry.get("jpegls"), source_frames(ds), {}))


def read_explicit_le(data: bytes) -> pydicom.Dataset:
    fp = DicomBytesIO(data)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return read_dataset(fp, is_implicit_VR=False, is_little_endian=True)


@pytest.mark.parametrize(
    ("key", "native"),
    [
        ("ct", "ct"),
        ("cr10", "cr10"),
        ("multiframe", "multiframe"),
        ("signed12", "signed12"),
        ("rle", "multiframe"),  # stored as it arrived, in a syntax of ours (RLE)
        ("jpeg_ls", "multiframe"),  # likewise, JPEG-LS from elsewhere
    ],
)
def test_spliced_explicit_le_equals_the_transcoded_dataset(
    samples: dict[str, Path], key: str, native: str
) -> None:
    """Every element, pixel data included, as transcode_dataset gives it; the stored bytes
    before Pixel Data are reused untouched. `native`: the sample with the same pixels."""
    source = samples[key]
    arrived = str(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    blob = stored_jpeg_ls(source) if arrived == EXPLICIT_LE else source.read_bytes()
    spliced = wire.decoded_explicit_le(blob)
    assert spliced is not None and spliced.transfer_syntax == EXPLICIT_LE
    data = b"".join(bytes(p) for p in spliced.parts)
    assert len(data) == spliced.encoded_length and len(data) % 2 == 0
    got = read_explicit_le(data)
    expected = transcode_dataset(pydicom.dcmread(BytesIO(blob)), EXPLICIT_LE)
    assert [e.tag for e in got] == [e.tag for e in expected]
    for elem in expected:
        assert got[elem.tag].value == elem.value, elem.keyword
    assert got["PixelData"].VR == expected["PixelData"].VR
    assert got.PixelData == pydicom.dcmread(samples[native]).PixelData
    start = wire.dataset_start(blob)
    assert data.startswith(blob[start : blob.index(b"\xe0\x7f\x10\x00", start)])


def test_stored_bytes_pass_through_untouched(samples: dict[str, Path]) -> None:
    blob = stored_jpeg_ls(samples["ct"])
    inst = wire.as_stored(blob, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", JPEG_LS)
    assert b"".join(bytes(p) for p in inst.parts) == blob[wire.dataset_start(blob) :]
    inst = WireInstance(inst)  # what pynetdicom's C-GET/C-MOVE loops are given (dimse/)
    assert inst.SOPInstanceUID == "1.2.3" and inst.file_meta.TransferSyntaxUID == JPEG_LS


def test_colour_and_foreign_syntaxes_are_left_to_transcode_dataset(
    samples: dict[str, Path],
) -> None:
    """Colour may need Planar Configuration rewritten; syntaxes without a codec of ours are
    decoded by pydicom, which also fixes attributes: neither is spliced."""
    assert wire.decoded_explicit_le(stored_jpeg_ls(samples["rgb"])) is None
    assert wire.decoded_explicit_le(samples["jpeg_lossless"].read_bytes()) is None


def unframe(buffers: list, max_pdu: int) -> tuple[bytes, bytes, list[int]]:
    """Parse framed PDUs back: (command, data set, control bytes), checking each length."""
    stream = b"".join(bytes(b) for b in buffers)
    command, data, controls, at = b"", b"", [], 0
    while at < len(stream):
        pdu_type, length = struct.unpack_from(">BxI", stream, at)
        assert pdu_type == 0x04 and (max_pdu == 0 or length <= max_pdu)
        item_length, _cx, control = struct.unpack_from(">IBB", stream, at + 6)
        assert item_length == length - 4
        payload = stream[at + 12 : at + 6 + length]
        controls.append(control)
        if control & 1:
            command += payload
        else:
            data += payload
        at += 6 + length
    return command, data, controls


@pytest.mark.parametrize("max_pdu", [0, 16384, 4096, 64, 20])
def test_framing_respects_the_maximum_pdu_and_marks_the_last_fragments(max_pdu: int) -> None:
    command = bytes(range(90))
    pixels = np.arange(5000, dtype="<u2")
    parts = [b"head" * 25, memoryview(pixels).cast("B"), b"tail"]
    buffers = frame(3, command, parts, max_pdu)
    got_command, got_data, controls = unframe(buffers, max_pdu)
    assert got_command == command
    assert got_data == b"head" * 25 + pixels.tobytes() + b"tail"
    commands = [c for c in controls if c & 1]
    datas = [c for c in controls if not c & 1]
    assert commands[-1] == 0x03 and set(commands[:-1]) <= {0x01}
    assert datas[-1] == 0x02 and set(datas[:-1]) <= {0x00}
    assert controls.index(datas[0]) > controls.index(commands[-1])  # command set first


@pytest.mark.parametrize("max_pdu", [1, 6])
def test_framing_refuses_a_maximum_pdu_with_no_room(max_pdu: int) -> None:
    """A peer may announce any maximum length; one without room for a byte is refused (as
    pynetdicom does) rather than looping."""
    with pytest.raises(ValueError, match="too small"):
        frame(1, b"cmd", [b"data"], max_pdu)


def test_framing_an_empty_data_set_still_ends_it() -> None:
    _command, data, controls = unframe(frame(1, b"cmd!", [], 0), 0)
    assert data == b"" and controls == [0x03, 0x02]


# --- big objects: streamed from the open blob file ------------------------------------


def _blob(samples: dict[str, Path], key: str, tmp_path: Path) -> Path:
    """The blob compacs keeps for the sample, as a file (JPEG-LS, or as it arrived)."""
    source = samples[key]
    arrived = str(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    path = tmp_path / f"{key}.dcm"
    path.write_bytes(stored_jpeg_ls(source) if arrived == EXPLICIT_LE else source.read_bytes())
    return path


@pytest.mark.parametrize("key", ["ct", "multiframe", "signed12", "rle", "jpeg_ls"])
def test_streamed_gives_the_bytes_of_the_in_memory_paths(
    samples: dict[str, Path], key: str, tmp_path: Path
) -> None:
    """Decoded to explicit VR LE frame by frame from the file: the data set of
    decoded_explicit_le, byte for byte; as stored: the blob itself (head included)."""
    path = _blob(samples, key, tmp_path)
    blob = path.read_bytes()
    stored = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    with open(path, "rb") as file:
        inst = wire.streamed(file, 0, len(blob), "1.2.3", "1.2.3.4", EXPLICIT_LE)
        assert inst is not None and inst.streamed
        data = b"".join(bytes(p) for p in inst.parts)
    spliced = wire.decoded_explicit_le(blob)
    assert data == b"".join(bytes(p) for p in spliced.parts)
    assert len(data) == inst.encoded_length
    assert pydicom.dcmread(BytesIO(inst.head + data)).PixelData == read_explicit_le(data).PixelData
    with open(path, "rb") as file:
        inst = wire.streamed(file, 0, len(blob), "1.2.3", "1.2.3.4", stored)
        assert inst.head + b"".join(bytes(p) for p in inst.parts) == blob
        assert inst.encoded_length == len(blob) - wire.dataset_start(blob)


@pytest.mark.parametrize("key", ["ct", "multiframe", "rle"])
def test_encoded_parts_give_frames_and_the_bytes_before_pixel_data(
    samples: dict[str, Path], key: str, tmp_path: Path
) -> None:
    """What a web face streams frame by frame, from every way of preparing an instance:
    as stored (in memory and streamed) the stored fragments of each frame, decoded to
    explicit VR LE the native frames; before_pixels is the data set up to Pixel Data."""
    path = _blob(samples, key, tmp_path)
    blob = path.read_bytes()
    ds = pydicom.dcmread(path)
    stored = str(ds.file_meta.TransferSyntaxUID)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    fragments = list(generate_frames(ds.PixelData, number_of_frames=count))
    start = wire.dataset_start(blob)
    before = blob[start : blob.index(b"\xe0\x7f\x10\x00", start)]
    spliced = wire.decoded_explicit_le(blob)
    native = read_explicit_le(b"".join(bytes(p) for p in spliced.parts)).PixelData
    in_memory = wire.as_stored(blob, "1.2.3", "1.2.3.4", stored)
    assert [bytes(f) for f in in_memory.frames()] == fragments
    assert in_memory.before_pixels() == before
    assert in_memory.head == blob[:start]
    assert spliced.before_pixels() == before
    joined = b"".join(bytes(f) for f in spliced.frames())
    assert len(list(spliced.frames())) == count
    assert native[: len(joined)] == joined and len(native) - len(joined) in (0, 1)  # pad
    with open(path, "rb") as file:
        streamed = wire.streamed(file, 0, len(blob), "1.2.3", "1.2.3.4", stored)
        assert [bytes(f) for f in streamed.frames()] == fragments
        assert streamed.before_pixels() == before
    with open(path, "rb") as file:
        streamed = wire.streamed(file, 0, len(blob), "1.2.3", "1.2.3.4", EXPLICIT_LE)
        assert b"".join(bytes(f) for f in streamed.frames()) == b"".join(
            bytes(f) for f in spliced.frames()
        )
        assert streamed.before_pixels() == before
        assert streamed.head == spliced.head


def test_streamed_leaves_other_targets_to_the_in_memory_path(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    path = _blob(samples, "ct", tmp_path)
    with open(path, "rb") as file:
        size = path.stat().st_size
        assert wire.streamed(file, 0, size, "1.2.3", "1.2.3.4", "1.2.840.10008.1.2") is None
        rgb = _blob(samples, "rgb", tmp_path)
    with open(rgb, "rb") as file:
        assert wire.streamed(file, 0, rgb.stat().st_size, "1", "1.2", EXPLICIT_LE) is None


def test_pixel_element_is_located_from_its_headers(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    native, encapsulated = samples["multiframe"], _blob(samples, "multiframe", tmp_path)
    for path, fragments in ((native, 0), (encapsulated, 10)):
        data = path.read_bytes()
        with open(path, "rb") as file:
            ds, element, error = wire.read_head(file, len(data))
        assert error is None and element.fragments == fragments
        # deferred: read from the file only if its value is asked for (get_item would)
        assert "PixelData" in ds and ds._dict[0x7FE00010].value is None
        assert data[element.header_at : element.header_at + 4] == b"\xe0\x7f\x10\x00"
        full = pydicom.dcmread(path)
        if fragments:
            assert element.length is None
            assert data[element.value_at : element.end - 8] == full.PixelData
        else:
            assert data[element.value_at : element.end] == full.PixelData
        truncated = tmp_path / "truncated.dcm"
        truncated.write_bytes(data[: element.end - 9])
        with open(truncated, "rb") as file:
            _ds, element, error = wire.read_head(file, element.end - 9)
        assert element is None and "truncated" in error


@pytest.mark.parametrize("max_pdu", [0, 16384, 20])
def test_framing_in_runs_carries_the_data_set_of_one_framing(max_pdu: int) -> None:
    """A streamed data set framed run by run (data_total, data_before): the same bytes,
    and only the PDU that ends the data set marked last."""
    command = bytes(range(90))
    pieces = [bytes([i]) * (1000 + 37 * i) for i in range(7)]
    total = sum(len(p) for p in pieces)
    buffers, before = [], 0
    for i, piece in enumerate(pieces):
        first = command if i == 0 else b""
        buffers += frame(3, first, [piece], max_pdu, data_total=total, data_before=before)
        before += len(piece)
    got_command, got_data, controls = unframe(buffers, max_pdu)
    assert got_command == command and got_data == b"".join(pieces)
    datas = [c for c in controls if not c & 1]
    assert datas[-1] == 0x02 and set(datas[:-1]) <= {0x00}
