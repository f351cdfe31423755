"""HEVC lossless over a volume (x265 through PyAV): each frame predicted from its neighbours
within a closed group of `gop_size` frames, the only codec here that uses the redundancy
between slices and cine frames. Private transfer syntax: never sent to a peer.

The bundled x265 takes 8, 10 and 12-bit samples (gray, gray10le, gray12le; yuv444p* for three
samples, one plane per sample). It refuses 16-bit input, so a volume qualifies when its value
span, after subtracting its minimum (volume.py), fits 12 bits. YBR_FULL is coded as stored.
RGB goes through JPEG 2000's reversible colour transform first, one bit deeper, where x265
has that depth (8-bit RGB as 10-bit planes; 12-bit RGB stays as stored): x265 does not predict
one plane from another, and measured on the RGB ultrasound frame (US1) the transform takes
HEVC from 2.7:1 to 6.2:1, while on the 30-frame YBR cine it would cost a third (19.0:1 to 12.7:1).

Each group is its own x265 stream (an IDR frame, then P and B frames, closed), so one frame
decodes from its group alone; in the volume container (volume.py) a group is one byte (0:
planes as stored, 1: RCT) followed by that stream in Annex B form. `lossless=1` codes every CU
with transquant bypass. `preset` is x265's (default `medium`). Measured here on one thread on
16 slices of the CT series and 32 frames of the US cine, against `medium`: `slower` is 2 % and
8 % smaller at a fifth of the speed (a cold tier may want it), `slow` gains nothing, `fast` is
3 % and 8 % larger at 1.2-1.5 times the speed, `ultrafast` (20 slices, 40 frames) 4 % and 11 %
larger at 3-4 times.

x265 is not always bit-exact. Found here on real data: pictures 16, 32 or 64 pixels wide (a
power of two no wider than its 64-pixel CTU) decode with wrong samples near the right edge in
P/B frames, differently from run to run (emri_small's 64² frames: 20 runs of 20; crops of the
CT series), also with x265's assembly off; with 16-pixel CTUs 32 and 64 were exact and 16 was
not. Widths 24, 40, 48, 56, 65-72, 80, 96-256 and 512, and 64-high pictures, decoded exactly in
the same runs. Such pictures are padded by 8 replicated columns before coding and cropped after
decoding (about 5 % more bytes on a 64² volume). Pictures smaller than x265's 16×16 minimum are
padded up to it. Every encode is still verified before it is stored (`volume.encode_verified`).
"""

from __future__ import annotations

import fractions
from typing import Any

import numpy as np

from .base import PixelFormat
from .volume import VolumeCodec

TRANSFER_SYNTAX_UID = "2.25.38871254023385371384039355074665861377"
PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
DEFAULT_PRESET = "medium"
AS_STORED, RCT = 0, 1  # first byte of each group: how its planes were transformed
MIN_SIDE = 16  # libx265 refuses smaller pictures
_PIXEL_FORMATS = {
    (1, 8): "gray",
    (1, 10): "gray10le",
    (1, 12): "gray12le",
    (3, 8): "yuv444p",
    (3, 10): "yuv444p10le",
    (3, 12): "yuv444p12le",
}


def coded_size(rows: int, columns: int) -> tuple[int, int]:
    """The picture size given to x265: at least 16×16, and never 16, 32 or 64 wide."""
    width = max(columns, MIN_SIDE)
    if width <= 64 and width & (width - 1) == 0:
        width += 8
    return max(rows, MIN_SIDE), width


class HEVC(VolumeCodec):
    name = "hevc"
    transfer_syntax_uid = TRANSFER_SYNTAX_UID
    lossless = True
    dependencies = ("av",)
    allowed_params = ("gop_size", "preset")
    description = "HEVC lossless over a volume, frames predicted from each other (x265, private)"
    coded_bits = (8, 10, 12)

    def check_available(self) -> str | None:
        reason = super().check_available()
        if reason is not None:
            return reason
        import av

        try:
            av.codec.Codec("libx265", "w")
            av.codec.Codec("hevc", "r")
        except av.codec.codec.UnknownCodecError as exc:
            return f"this build of av (PyAV) has no {exc}: pip install av"
        return None

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        preset = params.get("preset", DEFAULT_PRESET)
        if preset not in PRESETS:
            raise ValueError(f"hevc preset must be one of {', '.join(PRESETS)}, not {preset!r}")

    def encode_group(
        self, samples: np.ndarray, bits: int, fmt: PixelFormat, **params: Any
    ) -> bytes:
        depth = _rct_depth(bits) if fmt.photometric_interpretation == "RGB" else None
        if depth is None:
            return bytes([AS_STORED]) + _x265(samples, bits, params.get("preset", DEFAULT_PRESET))
        stream = _x265(rct(samples, bits), depth, params.get("preset", DEFAULT_PRESET))
        return bytes([RCT]) + stream

    def decode_group(self, data: bytes, count: int, bits: int, fmt: PixelFormat) -> np.ndarray:
        transform, stream = data[0], data[1:]
        if transform == AS_STORED:
            return _decode(stream, count, fmt.frame_shape, bits)
        depth = _rct_depth(bits)
        if transform != RCT or depth is None:
            raise ValueError(f"HEVC group has an unknown colour transform {transform}")
        return inverse_rct(_decode(stream, count, fmt.frame_shape, depth), bits)


def _x265(samples: np.ndarray, bits: int, preset: str) -> bytes:
    """One closed group: an IDR frame, then P and B frames, as an HEVC Annex B stream."""
    import av

    count, rows, columns = samples.shape[:3]
    planes = samples.shape[3] if samples.ndim == 4 else 1
    pix = _PIXEL_FORMATS[(planes, bits)]
    height, width = coded_size(rows, columns)
    pad = [(0, 0), (0, height - rows), (0, width - columns)] + [(0, 0)] * (samples.ndim - 3)
    if height != rows or width != columns:
        samples = np.pad(samples, pad, mode="edge")
    encoder = av.CodecContext.create("libx265", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, pix
    encoder.time_base = fractions.Fraction(1, 25)  # required, meaningless here
    x265 = [
        "lossless=1",
        f"keyint={count}",
        f"min-keyint={count}",
        "scenecut=0",
        "open-gop=0",
        "log-level=error",
        # One thread: the node runs one codec per worker; timing in bench/ is per thread.
        "pools=1",
        "frame-threads=1",
    ]
    encoder.options = {"preset": preset, "x265-params": ":".join(x265)}
    packets = []
    for index in range(count):
        picture = av.VideoFrame(width, height, pix)
        _write_planes(picture, samples[index])
        picture.pts = index
        packets += encoder.encode(picture)
    packets += encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def _decode(stream: bytes, count: int, frame_shape: tuple[int, ...], bits: int) -> np.ndarray:
    import av

    rows, columns = frame_shape[:2]
    planes = frame_shape[2] if len(frame_shape) == 3 else 1
    pix = _PIXEL_FORMATS[(planes, bits)]
    height, width = coded_size(rows, columns)
    decoder = av.CodecContext.create("hevc", "r")
    decoder.thread_count = 1
    pictures = []
    for packet in [*decoder.parse(stream), *decoder.parse(None)]:
        pictures += decoder.decode(packet)
    pictures += decoder.decode(None)
    if len(pictures) != count:
        raise ValueError(f"HEVC group holds {len(pictures)} frames, expected {count}")
    out = np.empty((count, *frame_shape), dtype=_dtype(bits))
    for index, picture in enumerate(pictures):
        if (picture.format.name, picture.height, picture.width) != (pix, height, width):
            raise ValueError(
                f"HEVC frame is {picture.format.name} {picture.width}x{picture.height}, "
                f"expected {pix} {width}x{height}"
            )
        _read_planes(picture, out[index])
    return out


def _dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint8) if bits <= 8 else np.dtype("<u2")


def _rct_depth(bits: int) -> int | None:
    """The depth RCT's differences need (one bit more than the samples), if x265 codes it."""
    return next((depth for depth in HEVC.coded_bits if depth > bits), None)


def rct(samples: np.ndarray, bits: int) -> np.ndarray:
    """JPEG 2000's reversible colour transform: R, G, B -> Y, B-G, R-G (differences offset
    by 2^bits - 1 to stay unsigned). HEVC has no prediction across planes that x265 uses."""
    r, g, b = (samples[..., k].astype(np.int32) for k in range(3))
    lift = (1 << bits) - 1
    out = np.stack([(r + 2 * g + b) >> 2, b - g + lift, r - g + lift], axis=-1)
    return out.astype(_dtype(bits + 1))


def inverse_rct(samples: np.ndarray, bits: int) -> np.ndarray:
    y, cb, cr = (samples[..., k].astype(np.int32) for k in range(3))
    lift = (1 << bits) - 1
    cb, cr = cb - lift, cr - lift
    g = y - ((cb + cr) >> 2)
    return np.stack([cr + g, g, cb + g], axis=-1).astype(_dtype(bits))


def _plane_view(plane: Any, dtype: np.dtype, height: int) -> np.ndarray:
    """A plane's buffer as a (height, line) array; lines are padded to an alignment."""
    return np.frombuffer(plane, dtype=dtype).reshape(height, -1)


def _write_planes(picture: Any, frame: np.ndarray) -> None:
    rows, columns = frame.shape[:2]
    channels = frame.reshape(rows, columns, -1)
    for k, plane in enumerate(picture.planes):
        _plane_view(plane, frame.dtype, picture.height)[:rows, :columns] = channels[..., k]


def _read_planes(picture: Any, out: np.ndarray) -> None:
    rows, columns = out.shape[:2]
    channels = out.reshape(rows, columns, -1)
    for k, plane in enumerate(picture.planes):
        channels[..., k] = _plane_view(plane, out.dtype, picture.height)[:rows, :columns]
