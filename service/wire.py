"""Stored objects made ready to go out (a C-STORE sub-operation, an export, a later web
face) without re-serialising them: the neutral :class:`EncodedParts` value.

Why: handing pynetdicom a Dataset costs a full pydicom write of it, and the pixel data of a
512² CT slice was copied about ten times on its way to the socket (decode, join, pad,
pydicom's element buffer, its stream, pynetdicom's stream, fragments, PDV headers): with
the PDU handling, 7 ms of CPU per image besides the 4 ms JPEG-LS decode, where Orthanc
spends 8 ms in all. An :class:`EncodedParts` is the data set encoding as a list of buffers
that point into the stored bytes and the decoded pixels, which dimse/bulk_store (pdu_runs)
frames and writes with one scatter-gather send. Two cases take this path, the common ones:

- the peer accepted the stored syntax: the stored data set, byte for byte;
- the peer wants explicit VR little endian and the blob is in one of our codecs' syntaxes
  with one sample per pixel: the stored bytes with only the Pixel Data element replaced by
  the decoded frames. Nothing else changes when such an object is decoded (transcode.py
  changes only Planar Configuration, and only for colour), so this is what
  transcode_dataset gives; tests/test_wire.py checks the two agree element by element.

Anything else (implicit VR, colour, pydicom-decoded syntaxes) goes through transcode_dataset.

A big object (a blob part larger than STREAM_ABOVE) is never held whole: `streamed` gives
the same two cases with parts read from the open blob file, and decoded, one frame at a
time while they are sent (bulk_store) or exported (write_part10).

Nothing here knows DIMSE: dimse/wire_instance.py wraps the value for pynetdicom.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service.compress import source_frames
from compacs.service.syntaxes import EXPLICIT_LE

if TYPE_CHECKING:
    from compacs.service.storage.index import Instance

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_ITEM, _SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000) and (FFFE,E0DD), read as LE uint32
# Blob parts larger than this are sent and exported from their file (`streamed`), never read
# whole; smaller ones take the in-memory path, one read and one scatter-gather send.
STREAM_ABOVE = 16 << 20
STREAM_CHUNK = 1 << 20  # bytes read from a blob file at a time


Buffer = bytes | bytearray | memoryview


@dataclass
class EncodedParts:
    """One instance encoded in `transfer_syntax`, protocol-free: what a C-STORE sub-operation
    sends (dimse/wire_instance.py adapts it for pynetdicom), what export writes as a Part-10
    file (write_part10), and what a web face can stream as application/dicom (`head`, then
    `parts`) or frame by frame (`frames`).

    `parts`: the data set's encoding in order, a list of buffers or (a streamed instance)
    an iterator over them, read from the open blob `source` as it is consumed, whose total
    `encoded_length` is known beforehand. `before_pixels` and `frames` locate the Pixel
    Data only when called, so the paths that send `parts` never pay for it; a streamed
    instance reads them from the same file, so take `parts` or these, not both at once."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    parts: Iterable[Buffer]
    encoded_length: int
    # the preamble and file meta a Part-10 file of it starts with, or what writes them
    _head: bytes | Callable[[], bytes]
    # the data set's bytes before its Pixel Data element (all of them without one)
    before_pixels: Callable[[], bytes]
    # each frame's bytes in `transfer_syntax`: native pixels, or the frame's fragments joined
    frames: Callable[[], Iterator[Buffer]]
    source: BinaryIO | None = None

    @property
    def streamed(self) -> bool:
        return not isinstance(self.parts, list)

    @property
    def head(self) -> bytes:
        if callable(self._head):
            self._head = self._head()
        return self._head

    def close(self) -> None:
        """Let go of the blob file of a streamed instance (after it was sent or written)."""
        if self.source is not None:
            self.source.close()


def dataset_start(blob: bytes) -> int:
    """Where the data set begins in Part-10 `blob`: after the file meta group, whose
    (0002,0000) group length is the first element after the preamble (PS3.10 7.1)."""
    if blob[128:132] != b"DICM" or blob[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part-10 file with a File Meta Information Group Length")
    (group_length,) = struct.unpack_from("<I", blob, 140)
    return 144 + group_length


def as_stored(blob: bytes, sop_class: str, sop_instance: str, syntax: str) -> EncodedParts:
    """The stored data set as it is (the peer accepted the stored syntax)."""
    start = dataset_start(blob)
    before_pixels, frames = _stored_layout(lambda: BytesIO(blob), 0, len(blob))
    return EncodedParts(
        sop_class,
        sop_instance,
        syntax,
        [memoryview(blob)[start:]],
        len(blob) - start,
        lambda: bytes(blob[:start]),
        before_pixels,
        frames,
    )


def decoded_explicit_le(blob: bytes) -> EncodedParts | None:
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
    start = dataset_start(blob)
    parts = [p for p in [view[start:header_at], element, pixels, pad, view[end:]] if len(p)]
    return EncodedParts(
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        EXPLICIT_LE,
        parts,
        sum(len(p) for p in parts),
        lambda: _part10_head(blob[:128], ds.file_meta, EXPLICIT_LE),
        lambda: bytes(view[start:header_at]),
        lambda: (memoryview(f).cast("B") for f in frames),
    )


def _part10_head(preamble: bytes, file_meta: Dataset, syntax: str) -> bytes:
    """The preamble and file meta of a Part-10 file of an object given in `syntax`."""
    meta = FileMetaDataset(file_meta)
    meta.TransferSyntaxUID = UID(syntax)
    head = BytesIO()
    head.write(bytes(preamble[:128]) + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue()


def _stored_layout(
    open_file: Callable[[], BinaryIO], offset: int, length: int
) -> tuple[Callable[[], bytes], Callable[[], Iterator[Buffer]]]:
    """`before_pixels` and `frames` of a stored Part-10 object, `length` bytes at `offset`
    of the file `open_file` gives; its Pixel Data is located (read_head) on the first call,
    so that sending or writing the object never parses it."""
    found: dict = {}

    def locate() -> dict:
        if not found:
            file = open_file()
            file.seek(offset)
            start = dataset_start(file.read(min(length, 1 << 16)))
            file.seek(offset)
            ds, element, error = read_head(file, offset + length)
            if error is not None:
                raise ValueError(error)
            found.update(file=file, start=offset + start, ds=ds, element=element)
        return found

    def before_pixels() -> bytes:
        at = locate()
        element = at["element"]
        end = offset + length if element is None else element.header_at
        return b"".join(_file_range(at["file"], at["start"], end))

    def frames() -> Iterator[Buffer]:
        at = locate()
        file, element = at["file"], at["element"]
        if element is None:
            return
        fmt = PixelFormat.from_dataset(at["ds"])
        if element.length is None:  # encapsulated: each frame's fragments, joined
            file.seek(element.value_at)
            for data in generate_frames(file, number_of_frames=fmt.number_of_frames):
                resume = file.tell()
                yield data
                file.seek(resume)  # generate_frames reads on from where it left off
            return
        if fmt.bits_allocated % 8:
            raise ValueError(f"{fmt.bits_allocated}-bit pixels: frames are not byte-aligned")
        size = fmt.rows * fmt.columns * fmt.samples_per_pixel * fmt.bits_allocated // 8
        for i in range(fmt.number_of_frames):
            first = element.value_at + i * size
            yield b"".join(_file_range(file, first, first + size))

    return before_pixels, frames


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data element of a Part-10 file sits, read from its headers only."""

    header_at: int  # the element's tag
    value_at: int
    length: int | None  # the value's length; None: undefined (encapsulated)
    end: int  # just past the value (past the Sequence Delimitation Item if encapsulated)
    items: tuple[tuple[int, int], ...] = ()  # encapsulated: (offset, length) of each item

    @property
    def fragments(self) -> int:
        """How many fragments follow the Basic Offset Table item."""
        return max(0, len(self.items) - 1)


def pixel_element(
    file: BinaryIO, at: int, size: int, *, implicit_vr: bool, little_endian: bool = True
) -> PixelElement | None:
    """The Pixel Data element whose header starts at `at` in `file` (`size` bytes long),
    where pydicom's ``stop_before_pixels`` leaves its file. Only headers are read: the
    length of native pixel data, or the item headers of encapsulated data, so that a big
    object is checked and located without its pixels in memory. None: no Pixel Data
    element starts there. Raises ValueError for a header or an item that is malformed or
    runs past the end of the file (truncated)."""
    order = "<" if little_endian else ">"
    file.seek(at)
    header = file.read(12)
    if len(header) < 8:
        return None
    if struct.unpack_from(f"{order}HH", header) != (0x7FE0, 0x0010):
        return None
    if implicit_vr:
        (length,) = struct.unpack_from(f"{order}I", header, 4)
        value_at = at + 8
    else:
        if len(header) < 12 or header[4:6] not in (b"OB", b"OW", b"UN"):
            raise ValueError(f"Pixel Data element with VR {header[4:6]!r}")
        (length,) = struct.unpack_from(f"{order}I", header, 8)
        value_at = at + 12
    if length != 0xFFFFFFFF:
        if value_at + length > size:
            raise ValueError(
                f"Pixel Data is {length} bytes long but the data set ends "
                f"{size - value_at} bytes after its header (truncated)"
            )
        return PixelElement(at, value_at, length, value_at + length)
    items = []
    pos = value_at
    while True:
        file.seek(pos)
        item = file.read(8)
        if len(item) < 8:
            raise ValueError(
                "encapsulated Pixel Data without a Sequence Delimitation Item (truncated)"
            )
        tag, item_length = struct.unpack("<II", item)
        pos += 8
        if tag == _SEQUENCE_END:
            return PixelElement(at, value_at, None, pos, tuple(items))
        if tag != _ITEM:
            raise ValueError(f"malformed encapsulated Pixel Data item at byte {pos - 8}")
        if pos + item_length > size:
            raise ValueError(
                f"an encapsulated Pixel Data item at byte {pos - 8} runs past the end of the "
                "data set (truncated)"
            )
        items.append((pos, item_length))
        pos += item_length


def read_head(file: BinaryIO, size: int) -> tuple[Dataset, PixelElement | None, str | None]:
    """A Part-10 file's data set read from where `file` stands up to its Pixel Data
    (pydicom), and that element located by its headers alone (pixel_element), or why it
    cannot be (malformed, truncated). The data set then holds Pixel Data as a deferred
    element: "PixelData" in it is true, and only reading its value would read the file.
    Raises what dcmread raises for a data set it cannot read. A deflated data set has no
    offsets in the file to locate anything by: its element is None, the caller's to handle."""
    ds = dcmread(file, stop_before_pixels=True)
    if UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_deflated:
        return ds, None, None
    implicit, little = ds.original_encoding  # as found, which may not be as said
    try:
        element = pixel_element(file, file.tell(), size, implicit_vr=implicit, little_endian=little)
    except ValueError as exc:
        return ds, None, str(exc)
    if element is not None:
        encapsulated = element.length is None
        ds[0x7FE00010] = RawDataElement(
            Tag(0x7FE00010),
            "OB" if encapsulated else "OW",
            0xFFFFFFFF if encapsulated else element.length,
            None,
            element.value_at,
            implicit,
            little,
        )
    return ds, element, None


def _file_range(file: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The bytes of `file` from `start` to `end`, in STREAM_CHUNK pieces."""
    while start < end:
        file.seek(start)
        piece = file.read(min(STREAM_CHUNK, end - start))
        if not piece:
            raise ValueError(f"the blob ends at byte {start}, {end - start} bytes early")
        yield piece
        start += len(piece)


def streamed(
    source: BinaryIO, offset: int, length: int, sop_class: str, sop_instance: str, target: str
) -> EncodedParts | None:
    """A big object, `length` bytes at `offset` of the open blob `source` (checked: see
    Archive.open_checked), in `target` read and decoded from the file as it is consumed:
    the stored syntax as stored, or explicit VR little endian spliced from one of our
    codecs' syntaxes (the cases of `as_stored` and `decoded_explicit_le`). None: neither
    applies (the caller reads it whole). Takes ownership of `source` when it returns an
    instance (closed by its `close`)."""
    source.seek(offset)
    prefix = source.read(min(length, 1 << 16))
    start = dataset_start(prefix)
    if len(prefix) < start:
        return None
    end = offset + length
    source.seek(offset)
    ds, element, _error = read_head(source, end)
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if target == str(syntax):
        before_pixels, stored_frames = _stored_layout(lambda: source, offset, length)
        return EncodedParts(
            sop_class,
            sop_instance,
            target,
            _file_range(source, offset + start, end),
            length - start,
            prefix[:start],
            before_pixels,
            stored_frames,
            source,
        )
    codec = registry.by_transfer_syntax(str(syntax))
    if target != EXPLICIT_LE or codec is None or syntax.is_implicit_VR:
        return None
    if element is None or element.length is not None:
        return None
    fmt = PixelFormat.from_dataset(ds)
    if fmt.samples_per_pixel != 1:
        return None
    frame_bytes = fmt.rows * fmt.columns * fmt.dtype.itemsize
    native = frame_bytes * fmt.number_of_frames
    pad = b"\0" * (native % 2)
    vr = b"OW" if fmt.bits_allocated > 8 else b"OB"
    header = _PIXEL_DATA_TAG + vr + b"\0\0" + struct.pack("<I", native + len(pad))

    def frames() -> Iterator[memoryview]:
        source.seek(element.value_at)
        for i, data in enumerate(generate_frames(source, number_of_frames=fmt.number_of_frames)):
            at = source.tell()
            frame = np.ascontiguousarray(codec.decode_frame(data, fmt), fmt.dtype)
            if frame.nbytes != frame_bytes:
                raise ValueError(f"frame {i} decodes to {frame.nbytes} bytes, not {frame_bytes}")
            yield memoryview(frame).cast("B")
            source.seek(at)  # generate_frames reads on from where it left off

    def parts() -> Iterator:
        yield from _file_range(source, offset + start, element.header_at)
        yield header
        yield from frames()
        if pad:
            yield pad
        yield from _file_range(source, element.end, end)

    body = (element.header_at - offset - start) + len(header) + native + len(pad)
    return EncodedParts(
        sop_class,
        sop_instance,
        EXPLICIT_LE,
        parts(),
        body + (end - element.end),
        _part10_head(prefix, ds.file_meta, EXPLICIT_LE),
        lambda: b"".join(_file_range(source, offset + start, element.header_at)),
        frames,
        source,
    )


def stream_stored(
    open_blob: Callable[[Instance], tuple[BinaryIO, int, int] | None],
    inst: Instance,
    target: str,
) -> EncodedParts | None:
    """A stored instance in `target`, streamed from its blob (`streamed`) when `open_blob`
    (ArchiveService.open_instance) opens it as big; None: the caller reads it whole. The
    blob is closed here unless the instance returned owns it, which retrieve and export
    would otherwise each have to get right on every path."""
    opened = open_blob(inst)
    if opened is None:
        return None
    source, offset, length = opened
    try:
        streaming = streamed(
            source, offset, length, inst.sop_class_uid, inst.sop_instance_uid, target
        )
    except BaseException:
        source.close()
        raise
    if streaming is None:
        source.close()
    return streaming


def write_part10(inst: EncodedParts, path: Path, opener: Callable = open) -> None:
    """An instance as a Part-10 file at `path` (export), one part at a time."""
    with opener(path, "wb") as out:
        out.write(inst.head)
        for part in inst.parts:
            out.write(part)


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
