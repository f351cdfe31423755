"""The shared runner behind every codec: try a rule's codecs in order, verify, encapsulate.

Invariant 2 lives here: every lossless encode is decoded and compared with the source
frames before its result can be stored; a mismatch or an error falls through to the next
codec of the rule and finally to storing the object exactly as received. Nothing in this
module touches the index, so it runs in worker processes as easily as in the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import iter_pixels
from pydicom.uid import UID, generate_uid

from compacs.codecs import registry
from compacs.codecs.base import Codec, PixelFormat, native_frames
from compacs.codecs.pydicom_uids import private_syntax
from compacs.service import syntaxes
from compacs.service.rules import CodecChoice
from compacs.service.syntaxes import EXPLICIT_BE, EXPLICIT_LE

log = logging.getLogger("compacs.compress")


@dataclass
class Outcome:
    """What the runner decided for one object."""

    data: bytes  # the Part-10 bytes to store
    codec: str  # the codec that produced `data`; "passthrough" when stored as received
    transfer_syntax: str
    notes: list[str] = field(default_factory=list)  # why earlier codecs were not used
    fallbacks: int = 0  # codec attempts that failed (error or verification mismatch)
    # Set when the pixel data as received does not decode: the object is kept as received
    # and the index flags it (a damaged or mutated compressed arrival).
    source_error: str | None = None
    derived: Derived | None = None  # a bounded-error result, a new instance


# What a failing codec may raise and still count as a failed attempt. Native extensions
# panic too: pyo3's PanicException (the RLE decoder on a frame shorter than its header
# says) derives from BaseException, not Exception. Only a request to stop is let through.
NOT_A_CODEC_FAILURE = (KeyboardInterrupt, SystemExit, GeneratorExit)


def is_lossy(ds: Dataset) -> bool:
    """Stored exactly as received, never decoded and re-encoded: PS3.3 C.7.6.1.1.5 would then
    demand a new SOP Instance UID, and the loss would compound."""
    return syntaxes.is_lossy(str(ds.file_meta.TransferSyntaxUID)) or (
        str(ds.get("LossyImageCompression", "")).strip() == "01"
    )


def source_frames(ds: Dataset) -> list[np.ndarray]:
    """The object's frames in the shared frame convention (codecs/base.py).

    An object in one of our own codecs' syntaxes is decoded by that codec, so that objects we
    stored and objects that arrived in that syntax read alike; anything else by pydicom.
    """
    fmt = PixelFormat.from_dataset(ds)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    codec = registry.by_transfer_syntax(syntax)
    if codec is not None:
        from pydicom.encaps import generate_frames

        frames = generate_frames(ds.PixelData, number_of_frames=fmt.number_of_frames)
        return [codec.decode_frame(f, fmt) for f in frames]
    volume = registry.volume_by_transfer_syntax(syntax)
    if volume is not None:  # one fragment: the frames coded together (a tier's volume form)
        from pydicom.encaps import generate_fragments

        return volume.decode_frames(b"".join(generate_fragments(ds.PixelData)), fmt)
    return [
        _little_endian(np.ascontiguousarray(f))
        for f in iter_pixels(ds, raw=True, decoding_plugin=_pydicom_plugin(ds))
    ]


def _little_endian(frame: np.ndarray) -> np.ndarray:
    """pydicom gives big endian arrivals' frames in big endian dtypes; codecs take the bytes
    of a frame as little endian (the frame convention), so the values are kept, the order
    changed. Before this, every big endian arrival failed verification and stayed as sent."""
    if frame.dtype.byteorder == ">":
        return frame.astype(frame.dtype.newbyteorder("<"))
    return frame


def _pydicom_plugin(ds: Dataset) -> str:
    # gdcm mis-decodes signed data with BitsStored < BitsAllocated (docs/design.md pitfalls).
    return "pylibjpeg" if syntaxes.is_encapsulated(str(ds.file_meta.TransferSyntaxUID)) else ""


def encoded_frames(
    codec: Codec, frames: list[np.ndarray], fmt: PixelFormat, params: dict
) -> tuple[list[bytes], int]:
    """Each frame encoded and decoded again: bit-exact for a lossless codec, within its
    error bound for a bounded-error one; the codestreams and the largest error measured.

    Raises ValueError on a verification mismatch; the caller falls back.
    """
    bound = codec.error_bound(params)
    encoded, max_error = [], 0
    for i, frame in enumerate(frames):
        data = codec.encode_frame(frame, fmt, **params)
        decoded = codec.decode_frame(data, fmt)
        if decoded.shape != frame.shape:
            raise ValueError(f"frame {i} decodes to shape {decoded.shape}, not {frame.shape}")
        if bound == 0:
            if not np.array_equal(decoded, frame):
                raise ValueError(f"frame {i} does not decode bit-exact")
        else:
            error = int(np.max(np.abs(decoded.astype(np.int64) - frame.astype(np.int64))))
            if error > bound:
                raise ValueError(f"frame {i}: max |error| {error} exceeds the bound {bound}")
            max_error = max(max_error, error)
        encoded.append(data)
    return encoded, max_error


def encoded_dataset(ds: Dataset, codec: Codec, frames: list[np.ndarray], params: dict) -> Dataset:
    """`ds` with its frames encoded by `codec` and verified (encoded_frames); a bounded-error
    result becomes a lossy derived object (`derive`)."""
    return _encoded(ds, codec, frames, params)[0]


def _encoded(
    ds: Dataset, codec: Codec, frames: list[np.ndarray], params: dict
) -> tuple[Dataset, Derived | None]:
    fmt = PixelFormat.from_dataset(ds)
    encoded, max_error = encoded_frames(codec, frames, fmt, params)
    out = with_frames(ds, codec, encoded, fmt)
    bound = codec.error_bound(params)
    if not bound:
        return out, None
    ratio = sum(f.nbytes for f in frames) / max(1, sum(len(e) for e in encoded))
    derive(out, ds, codec, bound, max_error, ratio)
    return out, Derived(str(out.SOPInstanceUID), str(ds.SOPInstanceUID), bound, max_error)


def with_frames(ds: Dataset, codec: Codec, encoded: list[bytes], fmt: PixelFormat) -> Dataset:
    """A copy of `ds` holding `encoded` as its encapsulated Pixel Data in `codec`'s syntax.

    A shallow copy shares its elements with `ds`: changed ones are replaced, never assigned
    to, so the caller's dataset keeps its own pixel data and syntax (a later codec may need
    them)."""
    out = shallow_copy(ds)
    out.file_meta = FileMetaDataset(shallow_copy(ds.file_meta))
    if str(ds.file_meta.TransferSyntaxUID) == EXPLICIT_BE:
        little_endian_words(out)
    out.file_meta["TransferSyntaxUID"] = DataElement(0x00020010, "UI", _syntax_value(codec))
    out[0x7FE00010] = DataElement(
        0x7FE00010, "OB", encapsulate(encoded, has_bot=len(encoded) > 1), is_undefined_length=True
    )
    if fmt.samples_per_pixel > 1:  # compressed colour frames are always colour-by-pixel
        out[0x00280006] = DataElement(0x00280006, "US", 0)
    return out


@dataclass(frozen=True)
class Derived:
    """A bounded-error result: a new instance derived from the one received (invariant 3)."""

    sop_instance_uid: str
    source_sop_instance_uid: str
    bound: int
    max_error: int


LOSSY_METHOD = "COMPACS_NEAR"  # (0028,2114), CS: no defined term names this codec


def derive(
    out: Dataset, source: Dataset, codec: Codec, bound: int, max_error: int, ratio: float
) -> None:
    """Make `out` what PS3.3 asks of an image after lossy compression (C.7.6.1.1.5): Lossy
    Image Compression 01 with the ratio and method appended to those it had, Image Type
    DERIVED, a new SOP Instance UID, and the source in the Source Image Sequence."""

    def values(keyword: str) -> list:
        value = source.get(keyword)
        if value is None or value == "":
            return []
        return list(value) if isinstance(value, MultiValue) else [value]

    image_type = values("ImageType") or ["DERIVED", "SECONDARY"]
    out.ImageType = ["DERIVED", *image_type[1:]]
    out.LossyImageCompression = "01"
    out.LossyImageCompressionRatio = [*values("LossyImageCompressionRatio"), round(ratio, 2)]
    out.LossyImageCompressionMethod = [*values("LossyImageCompressionMethod"), LOSSY_METHOD]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    out.SourceImageSequence = [*source.get("SourceImageSequence", []), reference]
    out.DerivationDescription = (
        f"compacs {codec.name}, near-lossless: max |error| {max_error} (bound {bound})"
    )[:1024]
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID


# Byte strings pydicom writes as they were read, whatever the target byte order: their
# word size, to swap them when a big endian arrival is written in a little endian syntax.
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def little_endian_words(ds: Dataset) -> None:
    """Swap, in `ds` (a shallow copy of a data set read as big endian), the bytes of the
    values pydicom leaves as bytes (OW, OF, OL, OD, OV: overlays, LUT data); it converts
    every value it decodes itself. Elements are replaced, never changed in place, so the
    data set the copy was made from keeps its own. Pixel Data is the caller's."""
    for elem in list(ds):
        if elem.tag == 0x7FE00010:
            continue
        if elem.VR == "SQ":
            items = []
            for item in elem.value:
                copy = shallow_copy(item)
                little_endian_words(copy)
                items.append(copy)
            ds[elem.tag] = DataElement(elem.tag, "SQ", items)
            continue
        size = _WORD_SIZES.get(elem.VR)
        if size and elem.value and len(elem.value) % size == 0:
            swapped = np.frombuffer(elem.value, f">u{size}").astype(f"<u{size}").tobytes()
            ds[elem.tag] = DataElement(elem.tag, elem.VR, swapped)


def ours(syntax: str) -> bool:
    """Whether one of compacs' codecs decodes `syntax` (source_frames does, not pydicom)."""
    return (
        registry.by_transfer_syntax(syntax) is not None
        or registry.volume_by_transfer_syntax(syntax) is not None
    )


def _syntax_value(codec: Codec) -> str:
    """The Transfer Syntax UID element's value: for a private syntax the UID that pydicom was
    told the encoding of (pydicom_uids.private_syntax), so that it writes the file."""
    uid = codec.transfer_syntax_uid
    return private_syntax(uid) if syntaxes.is_private(uid) else uid


def shallow_copy(ds: Dataset) -> Dataset:
    """A new data set holding the same elements. Not `Dataset(ds)` nor `copy.copy(ds)`:
    pydicom 3.0 lets those share `ds`'s element dict, so replacing an element of the "copy"
    replaced it in `ds` too (a failed codec left the source in its syntax)."""
    return Dataset(dict(ds.items()))


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def encode_dataset(
    ds: Dataset,
    codec: Codec,
    frames: list[np.ndarray],
    params: dict,
    splice: tuple[bytes, RawLayout] | None = None,
) -> tuple[bytes, Derived | None]:
    """Part-10 bytes of `encoded_dataset` (spliced into the received bytes when `splice`
    gives them and where they sit, see `raw_layout`), and what was derived if the codec
    is bounded-error (then more than the pixel data changes: never spliced)."""
    out, derived = _encoded(ds, codec, frames, params)
    if derived is not None:
        return part10(out), derived
    if splice is not None:
        raw, layout = splice
        spliced = _splice(raw, layout, ds, out)
        if spliced is not None:
            return spliced, None
    return part10(out), None


@dataclass(frozen=True)
class RawLayout:
    """Where the data set and its Pixel Data element sit in the received bytes."""

    dataset_start: int
    pixel_header: int
    pixel_end: int


def raw_layout(raw: bytes, ds: Dataset) -> RawLayout | None:
    """The layout of `raw`, where splicing is safe; read before the pixels are touched, while
    pydicom still holds the elements as read (with their offsets).

    Re-serialising a whole dataset with pydicom cost a third as much as the JPEG-LS encode
    itself (py-spy, CT 512²). Splicing keeps every other byte as received, so it applies
    only where nothing else changes: explicit VR little endian arrivals with native pixel
    data and no Planar Configuration to rewrite. None: not safe, re-serialise.
    """
    if str(ds.file_meta.TransferSyntaxUID) != EXPLICIT_LE or "PixelData" not in ds:
        return None
    if int(ds.get("PlanarConfiguration", 0) or 0) != 0:
        return None
    elem = ds.get_item("PixelData")
    value_at, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
    if value_at is None or length in (None, 0xFFFFFFFF):
        return None
    header = value_at - 12  # tag 4 + VR 2 + reserved 2 + length 4 (OB/OW)
    if raw[header : header + 4] != b"\xe0\x7f\x10\x00":
        return None
    first = next(iter(ds.keys()))
    first_elem = ds.get_item(first)
    # pydicom has already converted some elements (Specific Character Set): those keep the
    # offset of their value as file_tell
    first_at = getattr(first_elem, "value_tell", None) or getattr(first_elem, "file_tell", None)
    if first_at is None:
        return None
    long_header = first_elem.VR in (
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "SQ",
        "SV",
        "UC",
        "UN",
        "UR",
        "UT",
        "UV",
    )
    start = first_at - (12 if long_header else 8)  # not from the group length: often wrong
    tag = first.group.to_bytes(2, "little") + first.element.to_bytes(2, "little")
    if start < 132 or raw[start : start + 4] != tag:
        return None
    return RawLayout(start, header, value_at + length)


def _splice(raw: bytes, layout: RawLayout, ds: Dataset, out: Dataset) -> bytes | None:
    """The received bytes with only the file meta and the Pixel Data element replaced."""
    meta = BytesIO()
    meta.write(raw[:128] + b"DICM")
    write_file_meta_info(meta, out.file_meta, enforce_standard=True)
    pixels = out.PixelData
    # undefined length, the fragments, then the Sequence Delimitation Item
    delimiter = b"\xfe\xff\xdd\xe0" + bytes(4)
    element = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + pixels + delimiter
    spliced = b"".join(
        (
            meta.getvalue(),
            raw[layout.dataset_start : layout.pixel_header],
            element,
            raw[layout.pixel_end :],
        )
    )
    check = dcmread(BytesIO(spliced))  # cheap, and the proof the bytes are well formed
    if check.SOPInstanceUID != ds.SOPInstanceUID or check.PixelData != pixels:
        return None
    return spliced


def kept_as_received(ds: Dataset) -> str | None:
    """Why no codec is even tried on this object (None: the rule's codecs are): the one
    decision `compress` and `compacs rules explain` share."""
    if "PixelData" not in ds:
        return "no pixel data"
    if is_lossy(ds):
        return "lossy arrival: stored as received"
    return None


def _pixel_format(ds: Dataset, passthrough: Outcome | FileOutcome) -> PixelFormat | None:
    """The image attributes every codec needs; None when they cannot be read, recorded as
    `passthrough`'s source error, so that the object is kept as received and flagged."""
    try:
        return PixelFormat.from_dataset(ds)
    except (AttributeError, TypeError, ValueError) as exc:
        passthrough.source_error = f"image attributes cannot be read: {_describe(exc)}"
        passthrough.notes.append(passthrough.source_error)
        return None


def _fell_back(
    passthrough: Outcome | FileOutcome, codec: Codec, ds: Dataset, exc: BaseException
) -> None:
    """A codec attempt failed and the next one is tried: counted and noted on the outcome
    (jobs audits it as a codec_fallback) and logged for the administrator."""
    passthrough.fallbacks += 1
    passthrough.notes.append(f"{codec.name} failed: {_describe(exc)}")
    log.warning("codec %s failed on %s: %s", codec.name, ds.SOPInstanceUID, exc)


def _usable_codecs(
    choices: list[CodecChoice] | tuple[CodecChoice, ...],
    fmt: PixelFormat,
    received_ts: str,
    notes: list[str],
) -> Iterator[tuple[CodecChoice, Codec]]:
    """The rule's codecs that may be tried on this object, in the rule's order, for
    `compress` and `compress_file` alike: it stops at a passthrough choice or at the syntax
    the object arrived in (nothing after them is tried), and notes in `notes` why each
    skipped codec was not tried, so that the outcome explains itself."""
    for choice in choices:
        codec = registry.get(choice.name)
        if not codec.transfer_syntax_uid:  # passthrough: keep as received
            return
        if codec.transfer_syntax_uid == received_ts:
            notes.append(f"{codec.name}: arrived in that syntax already")
            return
        reason = codec.unsupported_reason(fmt) if codec.is_available() else "not available"
        if reason:
            notes.append(f"{codec.name}: {reason}")
            continue
        yield choice, codec


def compress(
    raw: bytes, ds: Dataset, choices: list[CodecChoice] | tuple[CodecChoice, ...]
) -> Outcome:
    """Apply a rule's codec choices to one received Part-10 object (`ds` is `raw` parsed)."""
    received_ts = str(ds.file_meta.TransferSyntaxUID)
    passthrough = Outcome(raw, "passthrough", received_ts)
    why = kept_as_received(ds)
    if why is not None:
        passthrough.notes.append(why)
        if "PixelData" not in ds:
            return passthrough
        try:  # never re-encoded; but an administrator should hear of pixels that don't decode
            source_frames(ds)
        except BaseException as exc:
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            passthrough.source_error = f"pixel data does not decode: {_describe(exc)}"
        return passthrough
    fmt = _pixel_format(ds, passthrough)
    if fmt is None:
        return passthrough
    layout = raw_layout(raw, ds)  # before the pixels are read: offsets are still known
    splice = (raw, layout) if layout is not None else None
    frames: list[np.ndarray] | None = None
    outcome = passthrough
    for choice, codec in _usable_codecs(choices, fmt, received_ts, passthrough.notes):
        if frames is None:
            try:
                frames = source_frames(ds)
            except BaseException as exc:
                if isinstance(exc, NOT_A_CODEC_FAILURE):
                    raise
                passthrough.source_error = f"pixel data does not decode: {_describe(exc)}"
                passthrough.notes.append(passthrough.source_error)
                break
        try:
            data, derived = encode_dataset(ds, codec, frames, choice.params, splice)
        except BaseException as exc:  # any codec failure must fall back, never lose the object
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            _fell_back(passthrough, codec, ds, exc)
            continue
        if len(data) >= len(raw):
            passthrough.notes.append(f"{codec.name}: no gain ({len(data)} >= {len(raw)} bytes)")
            continue
        outcome = Outcome(
            data,
            codec.name,
            codec.transfer_syntax_uid,
            passthrough.notes,
            passthrough.fallbacks,
            derived=derived,
        )
        break
    return outcome


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- big objects: compressed from their file, frame by frame -----------------------------


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
    `_splice` does (an implicit VR arrival's are written by pydicom, as `part10` would).
    `discard` deletes a blob written for a codec that gained nothing.

    None: an object this path does not take (big endian or deflated, colour by plane, a
    bounded-error codec, which derives a new object): the caller compresses it in memory.
    """
    from compacs.service.wire import read_head

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
    fmt = _pixel_format(ds, passthrough)
    if fmt is None:
        return passthrough
    for choice, codec in _usable_codecs(choices, fmt, received_ts, passthrough.notes):
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
            _fell_back(passthrough, codec, ds, exc)
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
        for frame in iter_pixels(source, raw=True, decoding_plugin=_pydicom_plugin(ds)):
            yield _little_endian(np.ascontiguousarray(frame))
    except GeneratorExit:
        raise
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        raise _SourceError(f"pixel data does not decode: {_describe(exc)}") from exc


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
    from compacs.service.wire import dataset_start, read_head

    source.seek(0)
    prefix = source.read(1 << 16)
    meta = FileMetaDataset(shallow_copy(ds.file_meta))
    meta["TransferSyntaxUID"] = DataElement(0x00020010, "UI", _syntax_value(codec))
    implicit = str(ds.file_meta.TransferSyntaxUID) == syntaxes.IMPLICIT_LE
    if implicit:  # re-encoded in explicit VR, as pydicom writes it in memory
        before, after = _around_pixels(source, ds, element, size, codec)
        out.write(before)
    else:  # every byte around the pixel data as received, as _splice does
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
