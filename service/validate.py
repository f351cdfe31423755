"""Checks on received objects, so that bad input gets a DICOM status instead of a crash.

Each failed check raises `BadInput` carrying the status to answer and a reason that the
log line shows with the calling AE title. Nothing here touches the disk or the index.
"""

from __future__ import annotations

import re
import struct

from pydicom import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import UID

# Digits and dots, no empty component, at most 64 characters (PS3.5 9.1). Leading zeros
# are tolerated: they are wrong but common, and harmless since UIDs never become paths.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class BadInput(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def check_dataset(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Raise BadInput if `ds` cannot be archived as the C-STORE request says it is."""
    for keyword in REQUIRED_UIDS:
        value = ds.get(keyword)
        if value in (None, ""):
            raise BadInput(STATUS_DATASET_MISMATCH, f"missing {keyword}")
        if not is_valid_uid(str(value)):
            raise BadInput(
                STATUS_DATASET_MISMATCH, f"{keyword} {str(value)[:80]!r} is not a valid UID"
            )
    if str(ds.SOPInstanceUID) != sop_instance_uid:
        raise BadInput(
            STATUS_DATASET_MISMATCH,
            f"SOPInstanceUID {ds.SOPInstanceUID} differs from the request's {sop_instance_uid}",
        )
    if str(ds.SOPClassUID) != sop_class_uid:
        raise BadInput(
            STATUS_DATASET_MISMATCH,
            f"SOPClassUID {ds.SOPClassUID} differs from the request's {sop_class_uid}",
        )
    if "PixelData" in ds:
        check_pixel_data(ds)


def check_pixel_data(ds: Dataset) -> None:
    """Pixel data must agree with the image attributes that say how to read it."""
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
    value = ds["PixelData"].value
    if value is None:
        raise BadInput(STATUS_DATASET_MISMATCH, "PixelData is empty")
    tsyntax = UID(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else None
    if tsyntax is not None and tsyntax.is_encapsulated:
        try:
            fragments = sum(1 for _ in generate_fragments(value))
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
    expected_bits = rows * cols * samples * frames * bits_allocated
    expected = (expected_bits + 7) // 8
    if not expected <= len(value) <= expected + 1:
        raise BadInput(
            STATUS_DATASET_MISMATCH,
            f"PixelData is {len(value)} bytes but Rows {rows} x Columns {cols} x "
            f"SamplesPerPixel {samples} x NumberOfFrames {frames} x BitsAllocated "
            f"{bits_allocated} needs {expected}",
        )
