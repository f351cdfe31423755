"""Frames encoded by one codec and verified, and the data set that holds them.

Invariant 2 is checked here, frame by frame: every encode is decoded again and compared
with its source (bit-exact, or within a bounded-error codec's bound) before it can be
kept. The result is a Part-10 object in the codec's syntax: spliced into the received
bytes where nothing but the pixel data changes, else written by pydicom; a bounded-error
result becomes a derived instance as PS3.3 asks (invariant 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from compacs.codecs.base import Codec, PixelFormat
from compacs.codecs.pydicom_uids import private_syntax
from compacs.service import syntaxes
from compacs.service.syntaxes import EXPLICIT_BE, EXPLICIT_LE


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
    out.file_meta["TransferSyntaxUID"] = DataElement(0x00020010, "UI", syntax_value(codec))
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


def syntax_value(codec: Codec) -> str:
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
