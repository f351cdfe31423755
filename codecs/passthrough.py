"""Passthrough: keep the object exactly as received, in its own transfer syntax.

It is the answer when no codec supports the pixel format (or a rule says not to compress,
or a lossy original must not be re-encoded), so it supports everything. It has no frame
functions: the service special-cases it and stores the received bytes untouched, which is
also why `transfer_syntax_uid` is empty (the object keeps whatever it had).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Codec, PixelFormat


class Passthrough(Codec):
    name = "passthrough"
    transfer_syntax_uid = ""
    lossless = True
    description = "store as received, no re-encoding"

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return None

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        raise NotImplementedError("passthrough stores objects as received; it never encodes")

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        raise NotImplementedError("passthrough stores objects as received; it never decodes")
