"""DICOM JSON (PS3.18 F.2) of query answers and instance metadata, by pydicom's
to_json_dict, with BulkDataURI in place of pixel data and large binary values so that a
series' metadata stays small (OHIF fetches pixels by frame)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom import Dataset

BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_THRESHOLD = 1024  # binary values longer than this become BulkDataURIs
PIXEL_DATA = 0x7FE00010
_HUGE = 1 << 62


def to_json(ds: Dataset) -> dict[str, Any]:
    """A query answer: every value inline (they are short, and come from the index)."""
    return ds.to_json_dict(bulk_data_threshold=_HUGE, bulk_data_element_handler=None)


def metadata(
    ds: Dataset, bulk_uri: Callable[[int], str], pixel_vr: str | None = None
) -> dict[str, Any]:
    """Instance metadata: top-level binary values over BULK_THRESHOLD and the pixel data
    (`pixel_vr`: its VR when the instance has pixels, read without them) as BulkDataURIs
    built by `bulk_uri(tag)`; values inside sequences inline."""
    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag == PIXEL_DATA or elem.tag.group in (0x0000, 0x0002):
            continue
        key = f"{tag:08X}"
        if elem.VR in BINARY_VRS and not elem.is_empty and _length(elem) > BULK_THRESHOLD:
            out[key] = {"vr": elem.VR, "BulkDataURI": bulk_uri(tag)}
            continue
        try:
            out[key] = elem.to_json_dict(None, _HUGE)
        except Exception:  # a value pydicom cannot render (damaged, kept flagged): its VR only
            out[key] = {"vr": elem.VR}
    if pixel_vr is not None:
        out[f"{PIXEL_DATA:08X}"] = {"vr": pixel_vr, "BulkDataURI": bulk_uri(PIXEL_DATA)}
    return out


def _length(elem: Any) -> int:
    value = elem.value
    return len(value) if isinstance(value, bytes | bytearray) else 0
