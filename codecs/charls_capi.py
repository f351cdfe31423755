"""CharLS's C API, called through the shared library that imagecodecs' wheel ships.

Why: pyjpegls writes the codestream DICOM wants (precision P = BitsStored, no SPIFF header)
but holds the GIL and spends ~7 ms on a 512² CT frame; imagecodecs' `jpegls_encode` releases
the GIL and is faster, but always writes P = 16 and a SPIFF header. The library underneath
both is CharLS: called directly (ctypes releases the GIL during a foreign call) with the
same frame info pyjpegls gives it, it writes the very bytes pyjpegls writes (tests/
test_charls_capi.py compares them on real images), about a quarter faster, and lets
threads encode on several cores.

This reaches into imagecodecs' internals (the vendored `imagecodecs.libs/libcharls-*.so`,
not a public interface), so it is kept here, used only with the CharLS version it was
tested with, and `encoder()` returns None otherwise: codecs/jpegls.py then uses pyjpegls,
the plain path, which the tests also run. `COMPACS_CHARLS_CAPI=0` switches it off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger("compacs.codecs")

TESTED_CHARLS = "2.4.3"

# (contiguous samples, rows, columns, samples per pixel, bits per sample, interleave mode)
Encoder = Callable[[np.ndarray, int, int, int, int, int], bytes]


class _FrameInfo(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("bits_per_sample", ctypes.c_int32),
        ("component_count", ctypes.c_int32),
    ]


def _library_path() -> Path | None:
    try:
        import imagecodecs
    except ImportError:
        return None
    libs = Path(imagecodecs.__file__).resolve().parent.parent / "imagecodecs.libs"
    found = sorted(libs.glob("libcharls*.so*"))
    return found[0] if found else None


@functools.cache
def encoder() -> Encoder | None:
    """The C API encoder, or None where it may not be used (no such library, another CharLS
    version, switched off): the caller then takes pyjpegls."""
    if os.environ.get("COMPACS_CHARLS_CAPI", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = _library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        lib.charls_get_version_string.restype = ctypes.c_char_p
        version = lib.charls_get_version_string().decode()
    except (OSError, AttributeError) as exc:
        log.info("CharLS C API not used (%s): JPEG-LS encodes through pyjpegls", exc)
        return None
    if version != TESTED_CHARLS:
        log.info(
            "CharLS %s in imagecodecs is not the tested %s: JPEG-LS encodes through pyjpegls",
            version,
            TESTED_CHARLS,
        )
        return None
    return _bind(lib)


def _bind(lib: ctypes.CDLL) -> Encoder:
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    lib.charls_jpegls_encoder_create.restype = pointer
    lib.charls_jpegls_encoder_create.argtypes = []
    lib.charls_jpegls_encoder_destroy.argtypes = [pointer]
    lib.charls_jpegls_encoder_destroy.restype = None
    signatures = {
        "set_frame_info": [pointer, ctypes.POINTER(_FrameInfo)],
        "set_near_lossless": [pointer, ctypes.c_int32],
        "set_interleave_mode": [pointer, ctypes.c_int32],
        "get_estimated_destination_size": [pointer, ctypes.POINTER(size)],
        "set_destination_buffer": [pointer, ctypes.c_void_p, size],
        "encode_from_buffer": [pointer, ctypes.c_void_p, size, ctypes.c_uint32],
        "get_bytes_written": [pointer, ctypes.POINTER(size)],
    }
    calls = {}
    for name, argtypes in signatures.items():
        function = getattr(lib, f"charls_jpegls_encoder_{name}")
        function.argtypes, function.restype = argtypes, ctypes.c_int32
        calls[name] = function
    lib.charls_get_error_message.restype = ctypes.c_char_p
    lib.charls_get_error_message.argtypes = [ctypes.c_int32]

    def check(code: int, step: str) -> None:
        if code:
            message = lib.charls_get_error_message(code).decode(errors="replace")
            raise RuntimeError(f"CharLS {step}: {message} (error {code})")

    def encode(
        data: np.ndarray, rows: int, columns: int, samples: int, bits: int, ilv: int
    ) -> bytes:
        """Lossless JPEG-LS of one frame: `data`, C-contiguous, holds rows x columns x
        samples unsigned values of `bits` bits (uint8 up to 8, uint16 above), by pixel for
        interleave modes 1 and 2, by plane for 0, as pyjpegls' `encode_buffer` takes them."""
        if not data.flags.c_contiguous or data.nbytes != rows * columns * samples * (
            1 if bits <= 8 else 2
        ):
            raise ValueError(f"CharLS input of {data.nbytes} bytes does not match the frame")
        handle = lib.charls_jpegls_encoder_create()
        if not handle:
            raise MemoryError("CharLS could not create an encoder")
        try:
            info = _FrameInfo(columns, rows, bits, samples)
            check(calls["set_frame_info"](handle, ctypes.byref(info)), "frame info")
            check(calls["set_near_lossless"](handle, 0), "near lossless")
            if samples > 1:
                check(calls["set_interleave_mode"](handle, ilv), "interleave mode")
            capacity = ctypes.c_size_t()
            check(
                calls["get_estimated_destination_size"](handle, ctypes.byref(capacity)),
                "destination size",
            )
            out = ctypes.create_string_buffer(capacity.value)
            check(calls["set_destination_buffer"](handle, out, capacity), "destination")
            check(calls["encode_from_buffer"](handle, data.ctypes.data, data.nbytes, 0), "encode")
            written = ctypes.c_size_t()
            check(calls["get_bytes_written"](handle, ctypes.byref(written)), "bytes written")
            return ctypes.string_at(out, written.value)
        finally:
            lib.charls_jpegls_encoder_destroy(handle)

    return encode
