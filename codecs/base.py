"""The one interface every pixel codec implements, and the pixel format it is judged on.

Modelled on pydicom 3's encoder backends: a codec declares the Python modules it needs,
answers `is_available()`, says which pixel formats it can take (and why not, so that
`compacs rules explain` can tell an administrator), and has one small encode and one
small decode function for a single frame. The shared runner (`compacs.service.compress`)
does the rest: frame iteration, verification, encapsulation, fallback. Volume codecs
(`codecs/volume.py`), which code many frames together, share the declarations (`Backend`).

Frame convention, shared by encoders and decoders so that verification is a plain
`numpy.array_equal`: one frame is the array pydicom 3's `iter_pixels(..., raw=True)` yields,
shape (rows, columns) or (rows, columns, samples), dtype from BitsAllocated and
PixelRepresentation (never shrunk to BitsStored), samples as stored (raw=True does no
YBR->RGB conversion), colour by pixel whatever the Planar Configuration. Bits above
BitsStored are normalised, as pydicom does for native data: unsigned values are masked to
BitsStored, signed values sign-extended from it. So garbage or overlay bits above HighBit
are not part of a frame and do not survive compression (no DICOM codec keeps them either).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset


@dataclass(frozen=True)
class PixelFormat:
    """The image attributes that decide whether a codec can take an image losslessly."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 two's complement
    photometric_interpretation: str
    number_of_frames: int = 1

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelFormat:
        return cls(
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
            bits_allocated=int(ds.BitsAllocated),
            bits_stored=int(ds.get("BitsStored", ds.BitsAllocated)),
            pixel_representation=int(ds.get("PixelRepresentation", 0)),
            photometric_interpretation=str(ds.get("PhotometricInterpretation", "")),
            number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        )

    @property
    def signed(self) -> bool:
        return self.pixel_representation == 1

    @property
    def frame_shape(self) -> tuple[int, ...]:
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)

    @property
    def dtype(self) -> np.dtype:
        kind = "i" if self.signed else "u"
        return np.dtype(f"<{kind}{max(1, self.bits_allocated // 8)}")


def to_unsigned_bits(frame: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Signed samples as their BitsStored-bit two's complement pattern, as unsigned integers.

    JPEG-LS, JPEG 2000 in DICOM and RLE code unsigned sample values; PS3.5 has signed
    data encoded as its bit pattern, which decoders sign-extend from BitsStored again.
    """
    if not fmt.signed:
        return frame
    unsigned = frame.view(frame.dtype.str.replace("i", "u"))
    return unsigned & np.array((1 << fmt.bits_stored) - 1, dtype=unsigned.dtype)


def from_unsigned_bits(frame: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Inverse of `to_unsigned_bits`: sign-extend a BitsStored-bit pattern into `fmt.dtype`."""
    out = np.ascontiguousarray(frame).astype(fmt.dtype.str.replace("i", "u"), copy=False)
    if not fmt.signed:
        return out.astype(fmt.dtype, copy=False)
    shift = fmt.bits_allocated - fmt.bits_stored
    signed = out.view(fmt.dtype)
    if shift:
        signed = (signed << shift) >> shift  # arithmetic shift sign-extends
    return signed


def native_frames(buffer: Any, offset: int, fmt: PixelFormat) -> Iterator[np.ndarray]:
    """The frames of native little endian pixel data at `offset` of `buffer` (a memory map
    of a big object's file), one at a time, in the frame convention: each a copy of its
    frame with the bits above BitsStored normalised as pydicom's ``iter_pixels(raw=True)``
    does, so that encoding from here and from pydicom's frames is the same. After each
    frame, its pages are dropped from the map (`buffer.madvise`), so that reading a big
    object does not add it to the process' resident memory.

    Whole-byte samples (BitsAllocated 8, 16, 32), colour by pixel (Planar Configuration 0)
    only: the caller reads anything else with pydicom.
    """
    shape = fmt.frame_shape
    frame_bytes = int(np.prod(shape)) * fmt.dtype.itemsize
    page = mmap.PAGESIZE
    for i in range(fmt.number_of_frames):
        start = offset + i * frame_bytes
        frame = np.frombuffer(buffer, fmt.dtype, int(np.prod(shape)), start).reshape(shape)
        frame = normalised(frame.copy(), fmt)
        low, high = start // page * page, (start + frame_bytes) // page * page
        if high > low and hasattr(buffer, "madvise"):
            buffer.madvise(mmap.MADV_DONTNEED, low, high - low)
        yield frame


def normalised(frame: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """`frame` (native samples, in place) with the bits above BitsStored normalised: masked
    for unsigned samples, sign-extended from BitsStored for signed ones."""
    unused = fmt.bits_allocated - fmt.bits_stored
    if unused <= 0:
        return frame
    if fmt.signed:
        frame <<= unused
        frame >>= unused  # arithmetic shift: sign-extends
    else:
        frame &= np.array((1 << fmt.bits_stored) - 1, dtype=frame.dtype)
    return frame


# What to install for each codec dependency: the extra that carries it, or its PyPI name.
INSTALL_HINTS = {
    "onnxruntime": "'compacs[cpu]'",  # or 'compacs[gpu]'; the CPU one is the usual answer
    "jpeg_ls": "pyjpegls",
    "openjpeg": "pylibjpeg-openjpeg",
    "rle": "pylibjpeg-rle",
    "av": "av",
    "imagecodecs": "imagecodecs",
    "constriction": "constriction",
}


def install_hint(module: str) -> str:
    return INSTALL_HINTS.get(module, module)


@functools.cache
def import_problem(module: str) -> str | None:
    """None if `module` imports; otherwise "" when it is simply not installed, or
    " (installed, but its import fails: ...)" when importing it fails otherwise."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module or (exc.name and module.startswith(f"{exc.name}.")):
            return ""
        return f" (installed, but its import fails: {type(exc).__name__}: {exc})"
    except Exception as exc:  # a broken install raises anything: ImportError, OSError, ...
        return f" (installed, but its import fails: {type(exc).__name__}: {exc})"
    return None


class Backend:
    """What every codec declares, whether it codes frames one by one or whole volumes.

    `params` are the per-rule parameters from the config file (for example an effort level);
    a codec rejects the ones it does not know in `check_params` so that a typo fails at
    start-up, not at the first image.
    """

    name: str = ""
    transfer_syntax_uid: str = ""
    lossless: bool = True
    dependencies: tuple[str, ...] = ()
    allowed_params: tuple[str, ...] = ()
    description: str = ""

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Why this codec cannot run here ("needs onnxruntime: pip install 'compacs[cpu]'"),
        or None; found once per process (`check_available`) and kept, so
        that the node's start, `codec list` and `rules explain` say the same thing."""
        if "_unavailable" not in self.__dict__:
            self._unavailable = self.check_available()
        return self._unavailable

    def check_available(self) -> str | None:
        """Each dependency is really imported: a package that is installed but broken (a
        wheel for another CPU, a missing shared library) is as unavailable as a missing one,
        and finding that at start beats a worker dying on the first image."""
        for module in self.dependencies:
            problem = import_problem(module)
            if problem is not None:
                return f"needs {module}: pip install {install_hint(module)}{problem}"
        return None

    def check_params(self, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.allowed_params))
        if unknown:
            allowed = ", ".join(self.allowed_params) or "none"
            raise ValueError(
                f"codec {self.name!r} has no parameter {', '.join(unknown)} (allowed: {allowed})"
            )

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        """Why this codec cannot take `fmt`, or None if it can."""
        raise NotImplementedError


class Codec(Backend):
    """A lossless or lossy frame codec producing one DICOM transfer syntax.

    Subclasses set the class attributes and implement `unsupported_reason`,
    `encode_frame` and `decode_frame`.
    """

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        raise NotImplementedError

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        raise NotImplementedError

    def error_bound(self, params: dict[str, Any]) -> int:
        """The max |error| these parameters allow: 0 for a lossless codec (verified
        bit-exact); a bounded-error codec says its bound, which the runner checks."""
        return 0


def int_param(codec: str, params: dict[str, Any], key: str, default: int, allowed: range) -> int:
    """An integer parameter from a rule (an int) or the command line (its decimal string).

    Floats, booleans and out-of-range values are refused with a message that names the codec,
    the parameter and the allowed values, so that a typo in a config fails at start-up.
    """
    value = params.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = allowed.start - 1
    if isinstance(value, bool | float) or number not in allowed or str(number) != str(value):
        raise ValueError(
            f"{codec} {key} must be an integer from {allowed.start} to {allowed.stop - 1}, "
            f"not {value!r}"
        )
    return number


MONO_AND_COLOUR = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR")


def profile_reason(fmt: PixelFormat, transfer_syntax_uid: str) -> str | None:
    """Why PS3.5 section 8.2 forbids `fmt` in this transfer syntax, or None: checked against
    pydicom's table of it (ENCODING_PROFILES), so that a codec refuses, say, 16-bit YBR_FULL
    in JPEG-LS (8 bits only) in `unsupported_reason` and a rule falls to its next codec, rather
    than writing an object that conformant decoders may refuse. Photometric Interpretation is
    compared as stored: compacs' codecs apply no colour transform."""
    from pydicom.pixels.encoders.base import ENCODING_PROFILES

    profiles = ENCODING_PROFILES.get(transfer_syntax_uid)  # type: ignore[call-overload]
    if profiles is None:
        return None
    same_pi = [p for p in profiles if p[0] == fmt.photometric_interpretation]
    for _pi, samples, representation, allocated, stored in same_pi:
        if (
            fmt.samples_per_pixel == samples
            and fmt.pixel_representation in representation
            and fmt.bits_allocated in allocated
            and fmt.bits_stored in stored
        ):
            return None
    if not same_pi:
        allowed = ", ".join(dict.fromkeys(p[0] for p in profiles))
        return f"PhotometricInterpretation {fmt.photometric_interpretation} (PS3.5: {allowed})"
    ranges = "; ".join(
        f"BitsAllocated {'/'.join(map(str, a))}, BitsStored {min(b)}..{max(b)}"
        + ("" if 1 in r else ", unsigned")
        for _pi, _spp, r, a, b in same_pi
    )
    return (
        f"{fmt.photometric_interpretation} with BitsAllocated {fmt.bits_allocated}, BitsStored "
        f"{fmt.bits_stored}, PixelRepresentation {fmt.pixel_representation} (PS3.5 allows "
        f"{ranges})"
    )


def common_unsupported_reason(
    fmt: PixelFormat,
    *,
    max_bits: int,
    photometric: tuple[str, ...] = MONO_AND_COLOUR,
    bits_allocated: tuple[int, ...] = (8, 16),
) -> str | None:
    """The checks every integer image codec here shares; codec modules add their own.

    Subsampled or already-transformed colour (YBR_FULL_422, YBR_PARTIAL_*, YBR_RCT/ICT) is
    outside the default `photometric`: the frame convention has no way to express it.
    """
    if fmt.bits_allocated not in bits_allocated:
        allowed = ", ".join(str(b) for b in bits_allocated)
        return f"BitsAllocated {fmt.bits_allocated} (supports {allowed})"
    if fmt.bits_stored > max_bits or fmt.bits_stored < 2:
        return f"BitsStored {fmt.bits_stored} (supports 2..{max_bits})"
    if fmt.bits_stored > fmt.bits_allocated:
        return f"BitsStored {fmt.bits_stored} > BitsAllocated {fmt.bits_allocated}"
    if fmt.samples_per_pixel not in (1, 3):
        return f"SamplesPerPixel {fmt.samples_per_pixel} (supports 1 or 3)"
    if fmt.signed and fmt.samples_per_pixel != 1:
        return "signed colour (PixelRepresentation 1 is only valid for one sample per pixel)"
    if fmt.photometric_interpretation not in photometric:
        return (
            f"PhotometricInterpretation {fmt.photometric_interpretation} "
            f"(supports {', '.join(photometric)})"
        )
    return None
