"""Volume codecs: the frames of a volume coded together, with a random-access point every
`gop_size` frames, so that one frame decodes without the rest.

A volume is the frames of one multi-frame instance (US cine, enhanced CT/MR), or of a series
of single-frame slices of one geometry, in slice order. Neighbouring slices and cine frames
are the largest redundancy in imaging, and per-frame codecs cannot use it.

The interface is small on purpose (frames in, bytes out, random access by frame), so that any
codec that predicts a frame from the previous ones (HEVC now, the learned codec later) plugs in
by coding one group of frames at a time (`encode_group` / `decode_group`):

- `unsupported_reason(fmt)`: why the pixel format rules the codec out, or None;
- `data_unsupported_reason(frames, fmt)`: why these values do (a span too wide for the
  codec's bit depths, a frame of another geometry), or None; both for `compacs rules explain`;
- `encode_volume(frames, fmt, **params) -> bytes`;
- `decode_frames(data, fmt, indices=None) -> list[np.ndarray]`: decodes only the groups that
  hold `indices` (at most `gop_size` frames per requested frame), each once;
- `frame_count(data)`.

Frames follow the frame convention of codecs/base.py, so verification is `numpy.array_equal`;
`encode_verified` does it group by group.

Container (little endian), self-describing so that a blob can be decoded without the index:
a 41-byte header (magic "CVOL", version, codec name, frame count, gop_size, rows, columns,
samples per pixel, bits allocated, signed, coded bit depth, value offset), then one u64 end
offset per group, relative to the end of that table, then the groups' bytes. The codec codes
`value - offset` (the volume's minimum) as unsigned samples of the coded bit depth, so a signed
CT whose values span fewer than 2^12 levels fits a 12-bit codec.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Backend, PixelFormat, common_unsupported_reason, int_param

MAGIC = b"CVOL"
VERSION = 1
_HEADER = struct.Struct("<4sB8sIIIIBBBBq")
_END = struct.Struct("<Q")
GOP_SIZES = range(1, 1025)
# Measured (bench/codecs.py, one core): 16 costs 1-2 % against groups of 32 (the whole CT and
# MR series, a quarter of the US cine) and is 0.4-6 % smaller than 8; one CT 512² slice then
# decodes in about 0.16 s (its group of 16 frames), 0.06 s with 8.
DEFAULT_GOP_SIZE = 16


class VolumeMismatch(ValueError):
    """An encoded volume does not decode to its source frames: fall back to another codec."""


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume blob says about itself, and where each group of frames lies in it."""

    codec: str
    frames: int
    gop_size: int
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    signed: bool
    coded_bits: int
    offset: int
    group_ends: tuple[int, ...]  # absolute end of each group's bytes in the blob
    payload_start: int

    @property
    def groups(self) -> int:
        return len(self.group_ends)

    def group_span(self, group: int) -> tuple[int, int]:
        """Where group `group`'s bytes lie in the blob: a reader needs only those."""
        return (self.group_ends[group - 1] if group else self.payload_start), self.group_ends[group]

    def group_bytes(self, data: bytes | memoryview, group: int) -> bytes:
        start, end = self.group_span(group)
        return bytes(data[start:end])

    def group_frames(self, group: int) -> range:
        return range(group * self.gop_size, min((group + 1) * self.gop_size, self.frames))

    def frame_shape(self) -> tuple[int, ...]:
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)


HEADER_SIZE = _HEADER.size


def header_length(prefix: bytes | memoryview) -> int:
    """The bytes the header and its group table take, from the first HEADER_SIZE bytes of a
    volume: what a reader that fetches ranges (an object store) fetches before a group."""
    frames, gop = _HEADER.unpack_from(prefix)[3:5]
    return _HEADER.size + (math.ceil(frames / gop) if gop else 0) * _END.size


def read_header(data: bytes | memoryview) -> VolumeHeader:
    if len(data) < _HEADER.size or bytes(data[:4]) != MAGIC:
        raise ValueError("not a compacs volume (no CVOL header)")
    _magic, version, codec, frames, gop, rows, cols, spp, bits, signed, coded, offset = (
        _HEADER.unpack_from(data)
    )
    if version != VERSION:
        raise ValueError(f"volume format version {version} (this compacs reads {VERSION})")
    groups = math.ceil(frames / gop) if gop else 0
    table_end = header_length(data)
    if not frames or not gop or len(data) < table_end:
        raise ValueError("volume header is truncated or empty")
    ends = tuple(
        table_end + _END.unpack_from(data, _HEADER.size + i * _END.size)[0] for i in range(groups)
    )
    if any(b < a for a, b in zip((table_end, *ends), ends, strict=False)) or ends[-1] > len(data):
        raise ValueError("volume group table is inconsistent with the blob's length")
    return VolumeHeader(
        codec.rstrip(b"\0").decode("ascii"),
        frames,
        gop,
        rows,
        cols,
        spp,
        bits,
        bool(signed),
        coded,
        offset,
        ends,
        table_end,
    )


def _pack(
    codec: str, fmt: PixelFormat, frames: int, gop: int, bits: int, offset: int, groups: list[bytes]
) -> bytes:
    fixed = _HEADER.pack(
        MAGIC,
        VERSION,
        codec.encode("ascii"),
        frames,
        gop,
        fmt.rows,
        fmt.columns,
        fmt.samples_per_pixel,
        fmt.bits_allocated,
        int(fmt.signed),
        bits,
        offset,
    )
    ends, total = [], 0
    for group in groups:
        total += len(group)
        ends.append(_END.pack(total))
    return b"".join([fixed, *ends, *groups])


def value_range(frames: Iterable[np.ndarray]) -> tuple[int, int]:
    """Smallest and largest value over all frames, without stacking them."""
    lows, highs = zip(*((int(f.min()), int(f.max())) for f in frames), strict=True)
    return min(lows), max(highs)


class VolumeCodec(Backend):
    """A codec whose unit is a volume. Subclasses set `coded_bits` (the sample depths they
    code, in increasing order) and implement `encode_group` and `decode_group`."""

    coded_bits: tuple[int, ...] = ()
    allowed_params: tuple[str, ...] = ("gop_size",)

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        int_param(self.name, params, "gop_size", DEFAULT_GOP_SIZE, GOP_SIZES)

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return common_unsupported_reason(fmt, max_bits=16)

    def data_unsupported_reason(self, frames: Sequence[np.ndarray], fmt: PixelFormat) -> str | None:
        """Why these frames cannot be coded as one volume (None: they can)."""
        if not len(frames):
            return "no frames"
        for i, frame in enumerate(frames):
            if frame.shape != fmt.frame_shape or frame.dtype != fmt.dtype:
                return (
                    f"frame {i} is {frame.dtype} {frame.shape}, not {fmt.dtype} {fmt.frame_shape}"
                    " like the volume"
                )
        lo, hi = value_range(frames)
        if self._coded_bits_for(hi - lo) is None:
            depths = ", ".join(str(b) for b in self.coded_bits)
            return (
                f"value span {lo}..{hi} needs {(hi - lo).bit_length()} bits; {self.name} codes "
                f"{depths} bits (after subtracting the volume's minimum)"
            )
        return None

    def _coded_bits_for(self, span: int) -> int | None:
        return next((b for b in self.coded_bits if span < 1 << b), None)

    def encode_volume(self, frames: Sequence[np.ndarray], fmt: PixelFormat, **params: Any) -> bytes:
        self.check_params(params)
        reason = self.unsupported_reason(fmt) or self.data_unsupported_reason(frames, fmt)
        if reason:
            raise ValueError(f"{self.name} cannot code this volume: {reason}")
        gop = int_param(self.name, params, "gop_size", DEFAULT_GOP_SIZE, GOP_SIZES)
        codec_params = {k: v for k, v in params.items() if k != "gop_size"}
        lo, hi = value_range(frames)
        bits = self._coded_bits_for(hi - lo)
        assert bits is not None  # data_unsupported_reason said so
        dtype = np.uint8 if bits <= 8 else np.dtype("<u2")
        groups = []
        for start in range(0, len(frames), gop):
            # One group's samples at a time: no stacked copy of a 500-slice series.
            samples = np.stack([f.astype(np.int32) - lo for f in frames[start : start + gop]])
            groups.append(self.encode_group(samples.astype(dtype), bits, fmt, **codec_params))
        return _pack(self.name, fmt, len(frames), gop, bits, lo, groups)

    def decode_frames(
        self, data: bytes | memoryview, fmt: PixelFormat, indices: Iterable[int] | None = None
    ) -> list[np.ndarray]:
        """Frames `indices` (all when None), in that order; decodes each needed group once.

        `data` may be an mmap of the blob: only the header and the needed groups are read.
        """
        header = self._header_for(data, fmt)
        wanted = list(range(header.frames)) if indices is None else [int(i) for i in indices]
        for index in wanted:
            if not 0 <= index < header.frames:
                raise IndexError(f"frame {index} is outside this {header.frames}-frame volume")
        decoded: dict[int, np.ndarray] = {}
        for group in sorted({i // header.gop_size for i in wanted}):
            count = len(header.group_frames(group))
            samples = self.decode_group(
                header.group_bytes(data, group), count, header.coded_bits, fmt
            )
            if samples.shape != (count, *fmt.frame_shape):
                raise ValueError(f"group {group} decoded to {samples.shape}")
            values = samples.astype(np.int32) + header.offset
            for index, frame in zip(header.group_frames(group), values, strict=True):
                decoded[index] = frame.astype(fmt.dtype)
        return [decoded[i] for i in wanted]  # a repeated index shares its array

    def frame_count(self, data: bytes | memoryview) -> int:
        return read_header(data).frames

    def _header_for(self, data: bytes | memoryview, fmt: PixelFormat) -> VolumeHeader:
        header = read_header(data)
        if header.codec != self.name:
            raise ValueError(f"volume was written by codec {header.codec!r}, not {self.name!r}")
        stored = (header.frame_shape(), header.bits_allocated, header.signed)
        if stored != (fmt.frame_shape, fmt.bits_allocated, fmt.signed):
            raise ValueError(
                f"volume holds {stored[0]} frames of {header.bits_allocated} bits "
                f"({'signed' if header.signed else 'unsigned'}), which does not match {fmt}"
            )
        return header

    def encode_group(
        self, samples: np.ndarray, bits: int, fmt: PixelFormat, **params: Any
    ) -> bytes:
        """Code `samples` (frames, rows, columns[, samples]), unsigned, `bits` deep, as one
        independently decodable group. `fmt` is the volume's (its photometric, for one)."""
        raise NotImplementedError

    def decode_group(self, data: bytes, count: int, bits: int, fmt: PixelFormat) -> np.ndarray:
        """Inverse of `encode_group`: `count` frames of `fmt.frame_shape`, unsigned."""
        raise NotImplementedError


def encode_verified(
    codec: VolumeCodec, frames: Sequence[np.ndarray], fmt: PixelFormat, **params: Any
) -> bytes:
    """`codec.encode_volume`, decoded again group by group and compared with `frames`.

    Raises VolumeMismatch naming the first frame that differs (x265 has been seen to get
    small frames wrong): the caller falls back to the next codec.
    """
    data = codec.encode_volume(frames, fmt, **params)
    header = read_header(data)
    for group in range(header.groups):
        span = header.group_frames(group)
        decoded = codec.decode_frames(data, fmt, span)
        for index, got in zip(span, decoded, strict=True):
            want = frames[index]
            if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
                raise VolumeMismatch(f"{codec.name}: frame {index} does not decode bit-exact")
    return data
