"""Big objects compressed from their file, frame by frame, never held whole.

The streaming twin of `compress.compress`: the same codec choice (`compress.usable_codecs`)
and the same check of every frame (invariant 2), but frames are read from the blob file
one at a time and each fragment written to the new blob as it comes. Compression jobs
take this path for objects over `wire.STREAM_ABOVE`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import iter_pixels
from pydicom.uid import UID

from compacs.codecs import registry
from compacs.codecs.base import Codec, PixelFormat, native_frames
from compacs.service import syntaxes
from compacs.service.compress import (
    NOT_A_CODEC_FAILURE,
    describe,
    fell_back,
    kept_as_received,
    pixel_format,
    usable_codecs,
)
from compacs.service.encode import part10, shallow_copy, syntax_value, with_frames
from compacs.service.pixels import little_endian_frame, pydicom_plugin
from compacs.service.rules import CodecChoice
from compacs.service.wire import dataset_start, read_head


@dataclass
class FileOutcome:
    """What `compress_file` decided; `written` is the size and checksum of the blob it wrote
    (None: kept as received, the caller keeps the source blob)."""

    codec: str
    transfer_syntax: str
    notes: list[str] = field(default_factory=list)
    fallbacks: int = 0
    source_error: str | None = None
    written: tuple[int, str] | None = None


class _SourceError(Exception):
    """A frame of the object as received could not be read or decoded."""


# Writes one blob (Archive.write_stream bound to the attempt's path): `produce` fills it.
BlobWriter = Callable[[Callable[[BinaryIO], None]], tuple[int, str]]


def compress_file(
    source: BinaryIO,
    size: int,
    choices: list[CodecChoice] | tuple[CodecChoice, ...],
    write: BlobWriter,
    discard: Callable[[], None],
) -> FileOutcome | None:
    """`compress` for a big received object, read from its open blob file (`size` bytes)
    and never held whole: native frames come from a memory map of the file, encapsulated
    ones one fragment at a time; each is encoded, decoded and compared (invariant 2) and
    its fragment written to the new blob (`write`) as it comes, the Basic Offset Table
    filled in at the end; every byte around the Pixel Data is copied as received, as
    encode.py's `_splice` does (an implicit VR arrival's are written by pydicom, as
    `part10` would).
    `discard` deletes a blob written for a codec that gained nothing.

    None: an object this path does not take (big endian or deflated, colour by plane, a
    bounded-error codec, which derives a new object): the caller compresses it in memory.
    """
    source.seek(0)
    ds, element, error = read_head(source, size)
    received_ts = str(ds.file_meta.TransferSyntaxUID)
    if UID(received_ts).is_deflated:  # nothing in the file to locate pixel data by
        return None
    passthrough = FileOutcome("passthrough", received_ts)
    why = kept_as_received(ds)
    if why is not None:
        passthrough.notes.append(why)
        if "PixelData" in ds:
            try:  # never re-encoded; but an administrator should hear of pixels that don't decode
                for _ in _frames(source, ds, element, size):
                    pass
            except _SourceError as exc:
                passthrough.source_error = str(exc)
        return passthrough
    encapsulated = syntaxes.is_encapsulated(received_ts)
    little_endian = encapsulated or received_ts in syntaxes.NATIVE
    if error is not None or element is None or not little_endian:
        return None
    if int(ds.get("PlanarConfiguration", 0) or 0) != 0:
        return None
    fmt = pixel_format(ds, passthrough)
    if fmt is None:
        return passthrough
    for choice, codec in usable_codecs(choices, fmt, received_ts, passthrough.notes):
        if codec.error_bound(choice.params):
            return None

        def produce(out: BinaryIO, codec: Codec = codec, params: dict = choice.params) -> None:
            frames = _frames(source, ds, element, size)
            _write_encoded(out, source, ds, element, size, codec, frames, fmt, params)

        try:
            written = write(produce)
        except _SourceError as exc:
            passthrough.source_error = str(exc)
            passthrough.notes.append(passthrough.source_error)
            break
        except BaseException as exc:  # any codec failure must fall back, never lose the object
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            fell_back(passthrough, codec, ds, exc)
            continue
        if written[0] >= size:
            discard()
            passthrough.notes.append(f"{codec.name}: no gain ({written[0]} >= {size} bytes)")
            continue
        return FileOutcome(
            codec.name,
            codec.transfer_syntax_uid,
            passthrough.notes,
            passthrough.fallbacks,
            written=written,
        )
    return passthrough


def _frames(source: BinaryIO, ds: Dataset, element: Any, size: int) -> Iterator[np.ndarray]:
    """The object's frames, one at a time, as `source_frames` gives them all; a failure to
    read or decode one is a _SourceError."""
    import mmap

    from pydicom.encaps import generate_frames

    try:
        fmt = PixelFormat.from_dataset(ds)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        codec = registry.by_transfer_syntax(syntax)
        whole = fmt.rows * fmt.columns * fmt.samples_per_pixel * fmt.number_of_frames
        native = element is not None and element.length is not None and syntax in syntaxes.NATIVE
        if native and fmt.bits_allocated % 8 == 0 and element.length >= whole * fmt.dtype.itemsize:
            with mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                yield from native_frames(mapped, element.value_at, fmt)
            return
        if codec is not None and element is not None:
            source.seek(element.value_at)
            for data in generate_frames(source, number_of_frames=fmt.number_of_frames):
                at = source.tell()
                yield codec.decode_frame(data, fmt)
                source.seek(at)  # the caller may have read elsewhere meanwhile
            return
        source.seek(0)
        for frame in iter_pixels(source, raw=True, decoding_plugin=pydicom_plugin(ds)):
            yield little_endian_frame(np.ascontiguousarray(frame))
    except GeneratorExit:
        raise
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        raise _SourceError(f"pixel data does not decode: {describe(exc)}") from exc


def _copy(source: BinaryIO, out: BinaryIO, start: int, end: int) -> None:
    while start < end:
        source.seek(start)
        piece = source.read(min(1 << 20, end - start))
        if not piece:
            raise ValueError(f"the source ends at byte {start}, {end - start} bytes early")
        out.write(piece)
        start += len(piece)


_ITEM_TAG = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _write_encoded(
    out: BinaryIO,
    source: BinaryIO,
    ds: Dataset,
    element: Any,
    size: int,
    codec: Codec,
    frames: Iterator[np.ndarray],
    fmt: PixelFormat,
    params: dict,
) -> None:
    """The received object with its Pixel Data encoded by `codec`, frame by frame, each
    verified before its fragment is written (invariant 2); everything else as received."""
    source.seek(0)
    prefix = source.read(1 << 16)
    meta = FileMetaDataset(shallow_copy(ds.file_meta))
    meta["TransferSyntaxUID"] = DataElement(0x00020010, "UI", syntax_value(codec))
    implicit = str(ds.file_meta.TransferSyntaxUID) == syntaxes.IMPLICIT_LE
    if implicit:  # re-encoded in explicit VR, as pydicom writes it in memory
        before, after = _around_pixels(source, ds, element, size, codec)
        out.write(before)
    else:  # every byte around the pixel data as received, as encode._splice does
        out.write(prefix[:128] + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        _copy(source, out, dataset_start(prefix), element.header_at)
    count = fmt.number_of_frames
    out.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    table_at = out.tell() + 8
    table = count * 4 if count > 1 else 0
    out.write(_ITEM_TAG + table.to_bytes(4, "little") + bytes(table))
    first, offsets = out.tell(), []
    for i, frame in enumerate(frames):
        if i >= count:
            raise ValueError(f"more frames than NumberOfFrames {count}")
        data = codec.encode_frame(frame, fmt, **params)
        decoded = codec.decode_frame(data, fmt)
        if decoded.shape != frame.shape or not np.array_equal(decoded, frame):
            raise ValueError(f"frame {i} does not decode bit-exact")
        offsets.append(out.tell() - first)
        padded = len(data) + len(data) % 2
        out.write(_ITEM_TAG + padded.to_bytes(4, "little") + data + b"\0" * (padded - len(data)))
    if len(offsets) != count:
        raise ValueError(f"{len(offsets)} frames for NumberOfFrames {count}")
    out.write(_SEQUENCE_DELIMITER)
    if implicit:
        out.write(after)
    else:
        _copy(source, out, element.end, size)
    if table:
        out.seek(table_at)
        out.write(np.asarray(offsets, "<u4").tobytes())
    out.flush()
    out.seek(0, 2)
    end = out.tell()
    out.seek(0)
    check, pixels, why = read_head(out, end)  # the proof the bytes are well formed
    if why or pixels is None or pixels.fragments != count:
        raise ValueError(f"the encoded object does not read back: {why or 'fragments differ'}")
    if check.SOPInstanceUID != ds.SOPInstanceUID:
        raise ValueError("the encoded object does not read back: SOP Instance UID differs")


def _around_pixels(
    source: BinaryIO, ds: Dataset, element: Any, size: int, codec: Codec
) -> tuple[bytes, bytes]:
    """The Part-10 bytes before and after the encapsulated Pixel Data of an implicit VR
    arrival in `codec`'s syntax: the data set without its pixel data (and the elements
    after it, read from the file) written by pydicom, as `part10(with_frames(...))` writes
    it, around a placeholder that is then cut out."""
    from pydicom.filereader import read_dataset

    out = shallow_copy(ds)
    out.file_meta = ds.file_meta
    del out[0x7FE00010]
    if element.end < size:
        source.seek(element.end)
        out.update(read_dataset(source, True, True, bytelength=size - element.end))
    marker = [b"\x5a\xa5"]
    placeholder = encapsulate(marker, has_bot=True)
    pixels = DataElement(0x7FE00010, "OB", placeholder, is_undefined_length=True)
    encoded = with_frames(out, codec, marker, PixelFormat.from_dataset(out))
    encoded[0x7FE00010] = pixels
    data = part10(encoded)
    cut = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + placeholder + _SEQUENCE_DELIMITER
    at = data.rindex(cut)
    return data[:at], data[at + len(cut) :]
