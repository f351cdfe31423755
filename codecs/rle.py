"""RLE Lossless (pylibjpeg-rle): the weakest ratio, but every DICOM decoder has it and it
takes greyscale samples up to 32 bits, so it is the last resort before passthrough.

RLE codes bytes, not values: each frame is split into one segment per byte of each sample
(most significant first), so signed data round-trips as raw bytes and BitsStored does not
matter. DICOM caps a frame at 15 segments, hence 8, 16 or 32 bits of greyscale; colour is
what PS3.5 8.2.2 allows: RGB and PALETTE COLOR at 8 or 16 bits, YBR_FULL at 8 only.
Decoded RLE is colour by plane whatever the Planar Configuration says; decoders know this.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Codec, PixelFormat, common_unsupported_reason, profile_reason


class RLE(Codec):
    name = "rle"
    transfer_syntax_uid = "1.2.840.10008.1.2.5"
    lossless = True
    dependencies = ("rle",)
    description = "RLE lossless (PackBits via pylibjpeg-rle)"

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        reason = common_unsupported_reason(fmt, max_bits=32, bits_allocated=(8, 16, 32))
        if reason is None and fmt.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2"):
            # PS3.5 8.2.2: colour only at 8 bits (YBR_FULL) or 8/16 (RGB, PALETTE COLOR).
            # Greyscale keeps 32 bits (Annex G: four segments), which pydicom decodes.
            reason = profile_reason(fmt, self.transfer_syntax_uid)
        return reason

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        from rle.utils import encode_pixel_data

        self.check_params(params)
        src = np.ascontiguousarray(frame, dtype=fmt.dtype)  # little-endian, colour by pixel
        return bytes(
            encode_pixel_data(
                src.tobytes(),
                rows=fmt.rows,
                columns=fmt.columns,
                samples_per_pixel=fmt.samples_per_pixel,
                bits_allocated=fmt.bits_allocated,
                byteorder="<",
            )
        )

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        from rle.utils import decode_pixel_data

        buffer = decode_pixel_data(
            bytes(data),
            version=2,
            rows=fmt.rows,
            columns=fmt.columns,
            bits_allocated=fmt.bits_allocated,
            byteorder="<",
        )
        arr = np.frombuffer(buffer, dtype=fmt.dtype)
        if arr.size != fmt.rows * fmt.columns * fmt.samples_per_pixel:
            raise ValueError(f"RLE frame has {arr.size} samples, expected {fmt.frame_shape}")
        if fmt.samples_per_pixel == 1:
            return arr.reshape(fmt.frame_shape)
        planes = arr.reshape(fmt.samples_per_pixel, fmt.rows, fmt.columns)
        return np.ascontiguousarray(planes.transpose(1, 2, 0))
