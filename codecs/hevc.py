"""HEVC lossless over a volume (x265 through PyAV): each frame predicted from its neighbours
within a closed group of `gop_size` frames, the only codec here that uses the redundancy
between slices and cine frames. Private transfer syntax: never sent to a peer.

The bundled x265 takes 8, 10 and 12-bit samples (gray, gray10le, gray12le; yuv444p* for three
samples, coded plane by plane in sample order without any colour conversion, so RGB and
YBR_FULL both stay as stored). It refuses 16-bit input, so a volume qualifies when its value
span, after subtracting its minimum (volume.py), fits 12 bits.

Each group is its own x265 stream (an IDR frame, then P and B frames, closed), so one frame
decodes from its group alone. `lossless=1` codes every CU with transquant bypass. `preset` is
x265's; measured here on one thread, against the default `medium`: `slow` saved 0.04 % on the
CT series at 27 % less speed, `ultrafast` was three times faster for 4 % more bytes on the CT
series and 10 % on the US cine.

x265 is not always bit-exact. Found here on real data: pictures exactly 16, 32 or 64 pixels
wide (one CTU or less, no conformance padding) decode with wrong samples near the right edge
in P/B frames, differently from run to run (emri_small's 64² frames, crops of the CT series);
widths 24-56, 65-72 and 96-512 decoded exactly in the same runs. Such pictures are padded by 8
replicated columns before coding and cropped after decoding, which costs about 5 % on a 64²
volume. Pictures smaller than x265's 16×16 minimum are padded up to it. Encoding is still
verified before anything is stored (`volume.encode_verified`).
"""

from __future__ import annotations

import fractions
from typing import Any

import numpy as np

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

    def is_available(self) -> bool:
        if not super().is_available():
            return False
        import av

        try:
            av.codec.Codec("libx265", "w")
            av.codec.Codec("hevc", "r")
        except av.codec.codec.UnknownCodecError:
            return False
        return True

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        preset = params.get("preset", DEFAULT_PRESET)
        if preset not in PRESETS:
            raise ValueError(f"hevc preset must be one of {', '.join(PRESETS)}, not {preset!r}")

    def encode_group(self, samples: np.ndarray, bits: int, **params: Any) -> bytes:
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
        preset = params.get("preset", DEFAULT_PRESET)
        encoder.options = {"preset": preset, "x265-params": ":".join(x265)}
        packets = []
        for index in range(count):
            picture = av.VideoFrame(width, height, pix)
            _write_planes(picture, samples[index])
            picture.pts = index
            packets += encoder.encode(picture)
        packets += encoder.encode(None)
        return b"".join(bytes(packet) for packet in packets)

    def decode_group(
        self, data: bytes, count: int, frame_shape: tuple[int, ...], bits: int
    ) -> np.ndarray:
        import av

        rows, columns = frame_shape[:2]
        planes = frame_shape[2] if len(frame_shape) == 3 else 1
        pix = _PIXEL_FORMATS[(planes, bits)]
        height, width = coded_size(rows, columns)
        decoder = av.CodecContext.create("hevc", "r")
        decoder.thread_count = 1
        pictures = []
        for packet in [*decoder.parse(data), *decoder.parse(None)]:
            pictures += decoder.decode(packet)
        pictures += decoder.decode(None)
        if len(pictures) != count:
            raise ValueError(f"HEVC group holds {len(pictures)} frames, expected {count}")
        out = np.empty((count, *frame_shape), dtype=np.uint8 if bits <= 8 else np.dtype("<u2"))
        for index, picture in enumerate(pictures):
            if (picture.format.name, picture.height, picture.width) != (pix, height, width):
                raise ValueError(
                    f"HEVC frame is {picture.format.name} {picture.width}x{picture.height}, "
                    f"expected {pix} {width}x{height}"
                )
            _read_planes(picture, out[index])
        return out


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
