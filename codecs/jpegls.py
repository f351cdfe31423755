"""JPEG-LS lossless (CharLS), the best ratio of the standard DICOM codecs.

The codestream is pyjpegls' `encode_buffer`'s: precision (SOF55 P) = BitsStored and no SPIFF
header; imagecodecs' `jpegls_encode` always writes 16 for 16-bit data, which costs 2-4% and
disagrees with the dataset's BitsStored. The same CharLS call is made through its C API
where that may be used (charls_capi.py: the same bytes, faster, without the GIL), and
through pyjpegls otherwise.

JPEG-LS has no notion of sign: PS3.5 has signed samples coded as their BitsStored-bit two's
complement pattern, and decoders (pydicom, DCMTK) sign-extend from BitsStored afterwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import charls_capi
from .base import (
    Codec,
    PixelFormat,
    common_unsupported_reason,
    from_unsigned_bits,
    profile_reason,
    to_unsigned_bits,
)

# Sample-interleaved (ILV 2) is what DICOM Planar Configuration 0 data means and what
# pydicom's own encoder writes; CharLS-based decoders (DCMTK, Orthanc, pydicom) read all three.
DEFAULT_INTERLEAVE = 2


class JpegLS(Codec):
    name = "jpegls"
    transfer_syntax_uid = "1.2.840.10008.1.2.4.80"
    lossless = True
    dependencies = ("jpeg_ls",)
    allowed_params = ("interleave_mode",)
    description = "JPEG-LS lossless (CharLS via pyjpegls)"

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        if params.get("interleave_mode", DEFAULT_INTERLEAVE) not in (0, 1, 2):
            raise ValueError("jpegls interleave_mode must be 0 (by plane), 1 (by line) or 2")

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        if fmt.bits_allocated == 16 and fmt.bits_stored <= 8:
            # The codestream then has 8-bit samples: DCMTK 3.6.7 refuses to decode it into
            # 16-bit pixels ("Image data mismatch") and pydicom returns uint8 arrays.
            return f"BitsStored {fmt.bits_stored} in BitsAllocated 16 (DCMTK cannot decode it)"
        return common_unsupported_reason(fmt, max_bits=16) or profile_reason(
            fmt, self.transfer_syntax_uid
        )

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        self.check_params(params)
        ilv = params.get("interleave_mode", DEFAULT_INTERLEAVE)
        data = to_unsigned_bits(frame, fmt)
        if fmt.samples_per_pixel > 1 and ilv == 0:
            data = data.transpose(2, 0, 1)  # ILV 0 takes colour by plane
        data = np.ascontiguousarray(data)
        ilv = ilv if fmt.samples_per_pixel > 1 else 0
        encode = charls_capi.encoder()
        if encode is not None:
            return encode(data, fmt.rows, fmt.columns, fmt.samples_per_pixel, fmt.bits_stored, ilv)
        return self.encode_pyjpegls(data, fmt, ilv)

    @staticmethod
    def encode_pyjpegls(data: np.ndarray, fmt: PixelFormat, ilv: int) -> bytes:
        """The plain path (and the reference the C API path is tested against)."""
        import jpeg_ls

        return bytes(
            jpeg_ls.encode_buffer(
                data.tobytes(),
                fmt.rows,
                fmt.columns,
                fmt.samples_per_pixel,
                fmt.bits_stored,
                lossy_error=0,
                interleave_mode=ilv,
            )
        )

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        # imagecodecs' CharLS releases the GIL: retrieval decodes the next object in a thread
        # while pynetdicom sends the current one. pyjpegls (same CharLS) holds it.
        try:
            import imagecodecs
        except ImportError:
            return self._decode_pyjpegls(data, fmt)
        arr = imagecodecs.jpegls_decode(bytes(data))
        if arr.shape[:2] != (fmt.rows, fmt.columns) or arr.size != np.prod(fmt.frame_shape):
            raise ValueError(f"JPEG-LS frame shape {arr.shape} does not match {fmt}")
        return from_unsigned_bits(arr.reshape(fmt.frame_shape), fmt)

    def _decode_pyjpegls(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        import jpeg_ls

        buffer, info = jpeg_ls.decode_buffer(bytes(data))
        if (info["height"], info["width"], info["components"]) != (
            fmt.rows,
            fmt.columns,
            fmt.samples_per_pixel,
        ):
            raise ValueError(f"JPEG-LS frame geometry {info} does not match {fmt}")
        arr = np.frombuffer(buffer, dtype="<u2" if info["bits_per_sample"] > 8 else np.uint8)
        if fmt.samples_per_pixel > 1 and info["interleave_mode"] == 0:
            arr = arr.reshape(fmt.samples_per_pixel, fmt.rows, fmt.columns).transpose(1, 2, 0)
        return from_unsigned_bits(arr.reshape(fmt.frame_shape), fmt)
