"""JPEG XL lossless (libjxl through imagecodecs): the best ratio of the per-frame codecs, for
the cold tiers, at a fraction of JPEG-LS's speed. Transfer syntax 1.2.840.10008.1.2.4.110
(pydicom 3.0.2 learns it from `pydicom_uids`); few peers decode it yet (DCMTK 3.6.7 and
Orthanc 1.10 do not), so retrieval transcodes for those that did not accept it.

`effort` (1-10, libjxl's range; default 7) trades speed for ratio. Measured here on one thread
(`bench/codecs.py`): effort 3 encodes about ten times faster than 7 (45 against 4 MB/s on the
CT series) for 2-13 % more bytes on single CT, MR and CR images and series (equal or 2 % fewer
on the 15-bit CR and the 64² MR), but 15 % more on the RGB ultrasound frame, 48 % on the
2-frame enhanced CT and 84-111 % on the ultrasound cines.

The codestream declares BitsStored as its bit depth (imagecodecs `bitspersample`), not the
container's 8 or 16: measured on real images at effort 3 that is 1.4 % smaller on the CT
series, 5 % on the 14-bit signed CT and 7 % on the 10-bit CR, and equal or a little smaller at
effort 7. Up to 12 bits the result is a bare codestream (FF0A); libjxl wraps deeper data
in the ISO box container with a "jxll" box (level 10). Both forms are valid JPEG XL.

JPEG XL codes unsigned samples. Signed data is coded as its BitsStored-bit two's complement
pattern, as PS3.5 has it for JPEG-LS and as the DICOM JPEG XL decoders that exist read it
(dicom-rs, for one, puts the decoded samples into Pixel Data unchanged): a standard reader then
gets the stored values back. An offset (+2^(BitsStored-1)) would be 1 % smaller on the signed
CT (measured) but would make every other decoder return shifted values, and the node passes
stored bytes through to peers that accept the syntax.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    Codec,
    PixelFormat,
    common_unsupported_reason,
    from_unsigned_bits,
    int_param,
    to_unsigned_bits,
)
from .pydicom_uids import JPEG_XL_LOSSLESS

EFFORTS = range(1, 11)  # libjxl: 1 fastest .. 10 smallest (11 needs its expert options)
DEFAULT_EFFORT = 7


class JpegXL(Codec):
    name = "jpegxl"
    transfer_syntax_uid = JPEG_XL_LOSSLESS
    lossless = True
    dependencies = ("imagecodecs",)
    allowed_params = ("effort",)
    description = "JPEG XL lossless (libjxl via imagecodecs)"

    def check_available(self) -> str | None:
        reason = super().check_available()
        if reason is not None:
            return reason
        import imagecodecs

        if getattr(imagecodecs, "JPEGXL", None) and imagecodecs.JPEGXL.available:
            return None
        return "this build of imagecodecs has no JPEGXL: pip install -U imagecodecs"

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        effort_of(params)

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return common_unsupported_reason(fmt, max_bits=16)

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        import imagecodecs

        self.check_params(params)
        samples = to_unsigned_bits(frame, fmt)
        if fmt.bits_stored <= 8:  # libjxl refuses 16-bit buffers declared 8 bits or fewer
            samples = samples.astype(np.uint8)
        # One thread: the node runs one codec per worker process, and more threads per
        # encode would only compete with ingest for the cores.
        return bytes(
            imagecodecs.jpegxl_encode(
                np.ascontiguousarray(samples),
                lossless=True,
                effort=effort_of(params),
                bitspersample=fmt.bits_stored,
                numthreads=1,
            )
        )

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        import imagecodecs

        arr = imagecodecs.jpegxl_decode(bytes(data), numthreads=1)
        if arr.size != np.prod(fmt.frame_shape) or arr.shape[:2] != (fmt.rows, fmt.columns):
            raise ValueError(f"JPEG XL frame shape {arr.shape} does not match {fmt.frame_shape}")
        return from_unsigned_bits(arr.reshape(fmt.frame_shape), fmt)


def effort_of(params: dict[str, Any]) -> int:
    return int_param("jpegxl", params, "effort", DEFAULT_EFFORT, EFFORTS)
