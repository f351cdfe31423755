"""Stored objects made ready for a C-STORE sub-operation without re-serialising them.

Why: handing pynetdicom a Dataset costs a full pydicom write of it, and the pixel data of a
512² CT slice was copied about ten times on its way to the socket (decode, join, pad,
pydicom's element buffer, its stream, pynetdicom's stream, fragments, PDV headers): with
the PDU handling, 7 ms of CPU per image besides the 4 ms JPEG-LS decode, where Orthanc
spends 8 ms in all. A :class:`WireInstance` is the data set encoding as a list of buffers
that point into the stored bytes and the decoded pixels, which bulk_store (pdu_runs) frames
and writes with one scatter-gather send. Two cases take this path, the common ones:

- the peer accepted the stored syntax: the stored data set, byte for byte;
- the peer wants explicit VR little endian and the blob is in one of our codecs' syntaxes
  with one sample per pixel: the stored bytes with only the Pixel Data element replaced by
  the decoded frames. Nothing else changes when such an object is decoded (transcode.py
  changes only Planar Configuration, and only for colour), so this is what
  transcode_dataset gives; tests/test_wire.py checks the two agree element by element.

Anything else (implicit VR, colour, pydicom-decoded syntaxes) goes through transcode_dataset.
"""

from __future__ import annotations

import struct
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import UID

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service.compress import source_frames
from compacs.service.syntaxes import EXPLICIT_LE

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_ITEM, _SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000) and (FFFE,E0DD), read as LE uint32


class WireInstance(Dataset):
    """A data set already encoded in `transfer_syntax`, as `parts` to send in order.

    A Dataset (pynetdicom's C-GET/C-MOVE loops insist on one) holding only the two UIDs
    they read; the content is in `parts`."""

    def __init__(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, parts: list
    ) -> None:
        super().__init__()
        self.SOPClassUID = UID(sop_class_uid)
        self.SOPInstanceUID = UID(sop_instance_uid)
        self.file_meta = Dataset()
        self.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        self.transfer_syntax = transfer_syntax
        self.parts = parts

    @property
    def encoded_length(self) -> int:
        return sum(len(p) for p in self.parts)


def dataset_start(blob: bytes) -> int:
    """Where the data set begins in Part-10 `blob`: after the file meta group, whose
    (0002,0000) group length is the first element after the preamble (PS3.10 7.1)."""
    if blob[128:132] != b"DICM" or blob[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part-10 file with a File Meta Information Group Length")
    (group_length,) = struct.unpack_from("<I", blob, 140)
    return 144 + group_length


def as_stored(blob: bytes, sop_class: str, sop_instance: str, syntax: str) -> WireInstance:
    """The stored data set as it is (the peer accepted the stored syntax)."""
    return WireInstance(sop_class, sop_instance, syntax, [memoryview(blob)[dataset_start(blob) :]])


def decoded_explicit_le(blob: bytes) -> WireInstance | None:
    """The stored object with native pixel data in explicit VR LE, spliced; None when this
    object cannot be spliced safely (the caller then uses transcode_dataset)."""
    ds = dcmread(BytesIO(blob))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if registry.by_transfer_syntax(syntax) is None or "PixelData" not in ds:
        return None
    fmt = PixelFormat.from_dataset(ds)
    if fmt.samples_per_pixel != 1:
        return None
    elem = ds.get_item("PixelData")
    value_at = getattr(elem, "value_tell", None)
    if value_at is None or elem.length != 0xFFFFFFFF:
        return None
    header_at = value_at - 12
    if blob[header_at : header_at + 4] != _PIXEL_DATA_TAG:
        return None
    end = _encapsulated_end(blob, value_at)
    frames = [np.ascontiguousarray(f, fmt.dtype) for f in source_frames(ds)]
    # one frame: a view of the decoder's array, no copy; several: joined once
    pixels = memoryview(frames[0]).cast("B") if len(frames) == 1 else b"".join(map(bytes, frames))
    pad = b"\0" * (len(pixels) % 2)
    vr = b"OW" if fmt.bits_allocated > 8 else b"OB"
    element = _PIXEL_DATA_TAG + vr + b"\0\0" + struct.pack("<I", len(pixels) + len(pad))
    view = memoryview(blob)
    parts = [view[dataset_start(blob) : header_at], element, pixels, pad, view[end:]]
    return WireInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT_LE, [p for p in parts if len(p)]
    )


def _encapsulated_end(blob: bytes, at: int) -> int:
    """The offset just past the Sequence Delimitation Item of encapsulated pixel data whose
    items start at `at`."""
    while at + 8 <= len(blob):
        tag, length = struct.unpack_from("<II", blob, at)
        at += 8
        if tag == _SEQUENCE_END:
            return at
        if tag != _ITEM:
            raise ValueError(f"malformed encapsulated pixel data at byte {at - 8}")
        at += length
    raise ValueError("encapsulated pixel data without a Sequence Delimitation Item")
