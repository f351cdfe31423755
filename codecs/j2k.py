"""JPEG 2000 Lossless Only (OpenJPEG through pylibjpeg-openjpeg): the most widely decoded
of the wavelet codecs, slower than JPEG-LS for about the same ratio.

A raw J2K codestream (not JP2), reversible 5-3 wavelet, no colour transform, so
Photometric Interpretation stays as received (RGB stays RGB, not YBR_RCT).

Signed data goes in as signed samples: the codestream's SIZ then says signed with precision
BitsStored, which is what PS3.5 8.2.4 asks for and what pydicom's sign correction expects
(an unsigned codestream for Pixel Representation 1 is the classic broken-CT case).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Codec, PixelFormat, common_unsupported_reason, from_unsigned_bits

# pylibjpeg-openjpeg's colour space codes; only sRGB would switch on the colour transform,
# and use_mct=False keeps it off.
_COLOUR_SPACE = {"RGB": 1, "MONOCHROME1": 2, "MONOCHROME2": 2, "YBR_FULL": 3}
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the JP2 signature box (ISO 15444-1 I.5.1)


class J2K(Codec):
    name = "j2k"
    transfer_syntax_uid = "1.2.840.10008.1.2.4.90"
    lossless = True
    dependencies = ("openjpeg",)
    description = "JPEG 2000 lossless (OpenJPEG via pylibjpeg-openjpeg)"

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return common_unsupported_reason(fmt, max_bits=16)

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        from openjpeg.utils import encode_array

        self.check_params(params)
        return bytes(
            encode_array(
                np.ascontiguousarray(frame),
                bits_stored=fmt.bits_stored,
                photometric_interpretation=_COLOUR_SPACE.get(fmt.photometric_interpretation, 0),
                use_mct=False,
                codec_format=0,
            )
        )

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        from openjpeg.utils import decode

        data = bytes(data)
        # Some writers put each frame in a JP2 file (GDCM's test file GDCMJ2K_TextGBR.dcm)
        # rather than the bare codestream PS3.5 A.4.4 asks for: read what is there.
        arr = decode(data, j2k_format=2 if data.startswith(JP2_SIGNATURE) else 0)
        if arr.shape != fmt.frame_shape:
            raise ValueError(f"J2K frame shape {arr.shape} does not match {fmt.frame_shape}")
        return to_frame(arr, fmt)


def to_frame(arr: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Decoded samples in the frame convention, whatever sign the codestream declared.

    Going through the BitsStored-bit pattern makes a codestream whose signedness disagrees
    with Pixel Representation (written by someone else) decode as pydicom decodes it.
    """
    if arr.dtype.itemsize > fmt.dtype.itemsize:
        raise ValueError(f"decoded {arr.dtype} does not fit BitsAllocated {fmt.bits_allocated}")
    unsigned = arr.astype(fmt.dtype).view(fmt.dtype.str.replace("i", "u"))
    pattern = unsigned & np.array((1 << fmt.bits_stored) - 1, dtype=unsigned.dtype)
    return from_unsigned_bits(pattern, fmt)
