"""What the node checks on a received object: what it refuses, and what it keeps but flags.

An archive that refuses what a modality sends loses that study at the modality: many
modalities retry a refused object for ever and block their send queue behind it. So the
policy (docs/conformance.md, "Acceptance policy") is:

- refused, always: a data set that cannot be parsed, no usable Study, Series or SOP
  Instance UID (missing, empty, multi-valued, over 64 characters, control characters or
  backslash: such a value cannot identify the object in the index), or a SOP Instance UID
  other than the one the C-STORE request names (the sender would believe it stored another
  instance);
- kept as received and flagged (a `Defect`), refused only with `[ingest] strict = true`:
  UIDs with characters outside digits and dots, a SOP Class UID missing or other than the
  request's, image attributes that cannot be read, pixel data longer or shorter than the
  attributes say, malformed encapsulated pixel data. Archive paths never come from peer
  strings (storage/archive.py hashes UIDs), so none of these endangers storage.

Each failed check raises `BadInput` carrying the status to answer and a reason that the
log line shows with the calling AE title. Nothing here touches the disk or the index.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue

from compacs.service import syntaxes

# Digits and dots, no empty component, at most 64 characters (PS3.5 9.1). Leading zeros
# are tolerated: they are wrong but common, and harmless since UIDs never become paths.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# What can identify an object at all: printable ASCII without backslash, 1-64 characters.
_USABLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,64}$")

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

IDENTITY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Photometric interpretations whose native pixel data holds two samples per pixel on
# average: Cb and Cr at half the horizontal rate (PS3.3 C.7.6.3.1.2).
_HALF_CHROMA = ("YBR_FULL_422", "YBR_PARTIAL_422")

PIXELS = "pixels"  # the kind of defect that rules out decoding and re-encoding


class BadInput(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Defect:
    """Something non-conformant about an object that is stored anyway."""

    kind: str  # PIXELS, "uid", "sop_class"
    text: str


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def uid_value(ds: Dataset, keyword: str) -> str | None:
    """The UID as the index keeps it (trailing NUL or space padding dropped), or None when
    the element is missing, empty or multi-valued."""
    value = ds.get(keyword)
    if value is None or isinstance(value, MultiValue):
        return None
    text = str(value).rstrip("\0 ")
    return text or None


@dataclass(frozen=True)
class PixelExtent:
    """Pixel Data of a big data set, found in its file by the element's headers alone (see
    wire.pixel_element), so that it is checked without being read: the value's length
    (native), or None and the number of fragments (encapsulated)."""

    length: int | None
    fragments: int = 0


def inspect(
    ds: Dataset, sop_class_uid: str, sop_instance_uid: str, extent: PixelExtent | None = None
) -> list[Defect]:
    """The defects of an object the node keeps; raises BadInput for one it refuses.
    `extent`: its Pixel Data as found in its file (the element in `ds` is not read)."""
    defects: list[Defect] = []
    for keyword in IDENTITY_UIDS:
        value = uid_value(ds, keyword)
        if value is None:
            raise BadInput(STATUS_DATASET_MISMATCH, f"missing {keyword}")
        if not _USABLE_RE.match(value):
            raise BadInput(
                STATUS_DATASET_MISMATCH,
                f"{keyword} {value[:80]!r} cannot identify an object (1-64 printable "
                "characters without backslash)",
            )
        if not is_valid_uid(value):
            defects.append(Defect("uid", f"{keyword} {value!r} is not a valid UID"))
    if uid_value(ds, "SOPInstanceUID") != sop_instance_uid.rstrip("\0 "):
        raise BadInput(
            STATUS_DATASET_MISMATCH,
            f"SOPInstanceUID {ds.SOPInstanceUID} differs from the request's {sop_instance_uid}",
        )
    sop_class = uid_value(ds, "SOPClassUID")
    if sop_class is None:
        defects.append(Defect("sop_class", "missing SOPClassUID"))
    elif sop_class != sop_class_uid.rstrip("\0 "):
        defects.append(
            Defect(
                "sop_class", f"SOPClassUID {sop_class} differs from the request's {sop_class_uid}"
            )
        )
    if "PixelData" in ds:
        try:
            check_pixel_data(ds, extent)
        except BadInput as exc:
            defects.append(Defect(PIXELS, exc.reason))
    return defects


def native_pixel_bytes(
    rows: int, cols: int, samples: int, frames: int, bits_allocated: int, photometric: str
) -> int:
    """The length native Pixel Data must have (before padding to an even length)."""
    per_row = cols * samples
    if samples == 3 and photometric in _HALF_CHROMA:
        per_row = cols * 2
    return (rows * per_row * frames * bits_allocated + 7) // 8  # 1-bit frames pack together


def check_pixel_data(ds: Dataset, extent: PixelExtent | None = None) -> None:
    """Pixel data must agree with the image attributes that say how to read it (as found
    in its file by `extent`, when given, instead of its value)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_allocated = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits_stored = int(ds.get("BitsStored", bits_allocated))
    except (AttributeError, TypeError, ValueError) as exc:
        raise BadInput(
            STATUS_DATASET_MISMATCH, f"pixel data without valid image attributes: {exc}"
        ) from exc
    if min(rows, cols, samples, frames) < 1 or bits_allocated not in (1, 8, 16, 32, 64):
        raise BadInput(
            STATUS_DATASET_MISMATCH,
            f"impossible image attributes Rows={rows} Columns={cols} SamplesPerPixel={samples} "
            f"NumberOfFrames={frames} BitsAllocated={bits_allocated}",
        )
    if not 1 <= bits_stored <= bits_allocated:
        raise BadInput(
            STATUS_DATASET_MISMATCH, f"BitsStored {bits_stored} > BitsAllocated {bits_allocated}"
        )
    value = ds["PixelData"].value if extent is None else b""
    if value is None:
        raise BadInput(STATUS_DATASET_MISMATCH, "PixelData is empty")
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if tsyntax and syntaxes.is_encapsulated(tsyntax):
        try:
            fragments = (
                extent.fragments
                if extent is not None
                else sum(1 for _ in generate_fragments(value))
            )
        except (ValueError, struct.error) as exc:
            raise BadInput(
                STATUS_DATASET_MISMATCH, f"encapsulated pixel data is malformed: {exc}"
            ) from exc
        if fragments < 1 or (frames > 1 and fragments < frames):
            raise BadInput(
                STATUS_DATASET_MISMATCH,
                f"encapsulated pixel data has {fragments} fragment(s) for {frames} frame(s)",
            )
        return
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    expected = native_pixel_bytes(rows, cols, samples, frames, bits_allocated, photometric)
    length = len(value) if extent is None or extent.length is None else extent.length
    if not expected <= length <= expected + 1:
        raise BadInput(
            STATUS_DATASET_MISMATCH,
            f"PixelData is {length} bytes but Rows {rows} x Columns {cols} x "
            f"SamplesPerPixel {samples} ({photometric}) x NumberOfFrames {frames} x "
            f"BitsAllocated {bits_allocated} needs {expected}",
        )
