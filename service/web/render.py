"""Rendered and thumbnail images (PS3.18 10.4.1.1.3, 8.3.5): a frame through its VOI
window (Window Center/Width as stored, else the frame's own range) to 8 bits, as PNG or
JPEG, for study lists that show a picture without decoding DICOM."""

from __future__ import annotations

import imagecodecs
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue

RENDERED_TYPES = ("image/png", "image/jpeg")


def window(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """8-bit image of `pixels` (stored values) through the Modality LUT (slope, intercept)
    and the first VOI window of `ds` (MONOCHROME1 inverted). Colour passes unchanged."""
    if pixels.ndim == 3:
        if pixels.dtype == np.uint8:
            return pixels
        top = float(pixels.max()) or 1.0
        return np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8)
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 1:
        low, high = float(values.min()), float(values.max())
        center, width = (low + high) / 2, max(high - low, 1.0)
    # PS3.3 C.11.2.1.2.1, the linear function
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    image = np.clip(scaled, 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        image = 255 - image
    return image


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def thumbnail(image: np.ndarray, size: int = 128) -> np.ndarray:
    """`image` shrunk (by whole steps, nearest sample) to fit in `size` pixels."""
    step = max(1, -(-max(image.shape[:2]) // size))
    return np.ascontiguousarray(image[::step, ::step])


def encode(image: np.ndarray, media_type: str, quality: int = 90) -> bytes:
    if media_type == "image/jpeg":
        return bytes(imagecodecs.jpeg8_encode(image, level=quality))
    return bytes(imagecodecs.png_encode(image))


def media_type(accept: str | None) -> str | None:
    """The first of RENDERED_TYPES the Accept header takes (PNG when it takes any)."""
    if not accept:
        return "image/png"
    for entry in accept.split(","):
        kind = entry.split(";")[0].strip().lower()
        if kind in RENDERED_TYPES:
            return kind
        if kind in ("*/*", "image/*"):
            return "image/png"
    return None
