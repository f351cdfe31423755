"""HTJ2K lossless (OpenJPH through imagecodecs): JPEG 2000 with the high-throughput block
coder, several times faster than OpenJPEG for a few percent less ratio.

Raw J2K codestream (starts FF4F, carries the Part 15 CAP marker), reversible wavelet.
imagecodecs switches the reversible colour transform on by default for 3 samples; it is
forced off so RGB stays RGB. imagecodecs writes the SIZ precision as the container size
(16 for BitsStored 12), not BitsStored: values are unchanged and pydicom/OpenJPEG decode
it correctly, but the header says 16. Signed data goes in as signed samples (SIZ signed).
Not every peer decodes HTJ2K (Orthanc 1.10 cannot): see docs/design.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Codec, PixelFormat, common_unsupported_reason
from .j2k import to_frame


class HTJ2K(Codec):
    name = "htj2k"
    transfer_syntax_uid = "1.2.840.10008.1.2.4.201"
    lossless = True
    dependencies = ("imagecodecs",)
    description = "HTJ2K lossless (OpenJPH via imagecodecs)"

    def check_available(self) -> str | None:
        reason = super().check_available()
        if reason is not None:
            return reason
        import imagecodecs

        if getattr(imagecodecs, "HTJ2K", None) and imagecodecs.HTJ2K.available:
            return None
        return "this build of imagecodecs has no HTJ2K: pip install -U imagecodecs"

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return common_unsupported_reason(fmt, max_bits=16)

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        import imagecodecs

        self.check_params(params)
        arr = np.ascontiguousarray(frame)
        data = bytes(imagecodecs.htj2k_encode(arr, reversible=True, rgb=False, planar=False))
        if data[:4] != b"\xff\x4f\xff\x51":
            raise RuntimeError("imagecodecs.htj2k_encode did not return a raw J2K codestream")
        return data

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        import imagecodecs

        arr = imagecodecs.htj2k_decode(bytes(data), planar=False)
        if arr.shape != fmt.frame_shape:
            raise ValueError(f"HTJ2K frame shape {arr.shape} does not match {fmt.frame_shape}")
        return to_frame(arr, fmt)
