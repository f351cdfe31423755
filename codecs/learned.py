"""The learned codec: lossless (δ = 0) or bounded-error (max |error| ≤ δ) with an integer network.

A causal network (models/) predicts every pixel's mean and scale from its causal neighbourhood;
the residual is range-coded against fixed integer tables. The network is integer-exact, so a
bitstream decodes bit-identically on any CPU or GPU; each bitstream names the model that made
it (a hash of the shipped files) and carries a checksum of the reconstruction, and a decoder
with another model refuses it instead of returning wrong pixels.

δ > 0 quantises the residual in steps of 2δ+1 in closed loop (the contexts are reconstructed
values, as in JPEG-LS NEAR): every pixel is within δ of the original, by construction. Such an
object is lossy in DICOM's sense: `lossless_for(params)` says which parameters are lossless.

Images larger than 512² are coded as independent 512² tiles (each its own statistics and
bitstream): lossless tiles join without seams, bounded ones keep the bound at every pixel. All
tiles of one shape, across the frames given to `decode_frames`, decode as one batch per
wavefront step (models/wavefront.py): the GPU path for a series, the same code on a CPU.

Bitstream: header (magic, version, model id, δ, rows, columns, tile size, tile count, checksum
of the reconstructed frame), one record per tile (lo, hi, d, base scale, scale offset, length),
then the tiles' range-coder words. Private transfer syntax: never sent to a peer.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from typing import Any

import numpy as np

from .base import Codec, PixelFormat, int_param

TRANSFER_SYNTAX_UID = "2.25.113459380518506504330348662722377354476"
MAGIC = b"CPXL"
VERSION = 1
_HEADER = struct.Struct("<4sB16sHIIHI8s")
_TILE = struct.Struct("<iiIHHI")
MAX_DELTA = 255
MIN_SIDE = 8


def checksum(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=8).digest()


def unpack_records(
    data: bytes, pos: int, record: struct.Struct, count: int, what: str
) -> tuple[list[tuple], int]:
    """`count` fixed-size records from `data` at `pos`, and the position after them; a clear
    error instead of struct's when the data ends early (a truncated or damaged blob)."""
    if pos + count * record.size > len(data):
        raise ValueError(f"{what} is truncated: it ends inside its headers")
    return [record.unpack_from(data, pos + k * record.size) for k in range(count)], (
        pos + count * record.size
    )


def payload_words(data: bytes, pos: int, nbytes: int, what: str) -> np.ndarray:
    """A tile's range-coder words, checked against what is there."""
    if nbytes % 4 or pos + nbytes > len(data):
        raise ValueError(f"{what} is truncated or damaged: a tile of {nbytes} bytes at {pos}")
    return np.frombuffer(data, dtype="<u4", count=nbytes // 4, offset=pos).astype(np.uint32)


def check_version(what: str, version: int, supported: int) -> None:
    if version != supported:
        raise ValueError(
            f"{what} version {version}, this decoder reads {supported}: decode it with the "
            "compacs version that wrote it"
        )


def unknown_model(what: str, made_by: bytes, loaded: bytes) -> ValueError:
    """A blob coded by a model that is neither the loaded one nor a retired one."""
    return ValueError(
        f"{what} was made by model {made_by.hex()}, but the loaded model is {loaded.hex()} and "
        "no retired model has that id: decode it with the compacs release that ships that model "
        "(models/shipped/ or models/retired/)"
    )


def undecodable(what: str) -> ValueError:
    """constriction asserts when the coded words cannot come from the tables: damaged data."""
    return ValueError(
        f"{what} does not decode (damaged data, or a decoder that computes differently): "
        "do not use it"
    )


def parse_delta(params: dict[str, Any]) -> int:
    """δ from rule or CLI parameters: 0 (lossless, the default) to MAX_DELTA (max |error|)."""
    return int_param("learned", params, "delta", 0, range(MAX_DELTA + 1))


def unsupported_reason(fmt: PixelFormat) -> str | None:
    """Why the learned model cannot code images of `fmt` (None: it can); the series codec
    (learned_volume.py) has the same limits."""
    if fmt.samples_per_pixel != 1:
        return (
            f"colour (SamplesPerPixel {fmt.samples_per_pixel}): the learned model codes "
            "single-channel images"
        )
    if fmt.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2"):
        photometric = fmt.photometric_interpretation
        return f"PhotometricInterpretation {photometric} (supports MONOCHROME1/2)"
    if fmt.bits_allocated != 16:
        return f"BitsAllocated {fmt.bits_allocated} (supports 16: 9-16-bit images)"
    if not 9 <= fmt.bits_stored <= 16:
        return f"BitsStored {fmt.bits_stored} (supports 9..16; the model learned 10-16-bit data)"
    if min(fmt.rows, fmt.columns) < MIN_SIDE:
        return f"size {fmt.rows}x{fmt.columns} (needs at least {MIN_SIDE} rows and columns)"
    return None


class ShippedModel:
    """The model a learned codec codes with (the shipped one unless given), loaded on first use
    so that listing codecs opens no ONNX Runtime session; available only when ONNX Runtime
    imports and the model files are there. Shared by the frame codec here and the volume codec
    (learned_volume.py)."""

    dependencies = ("onnxruntime", "constriction")

    def __init__(self, model: Any = None):
        self._model = model  # a compacs.models.runtime.Model; the shipped one by default

    @property
    def model(self):
        if self._model is None:
            from compacs.models.runtime import load_model

            self._model = load_model()
        return self._model

    def check_available(self) -> str | None:
        reason = super().check_available()
        if reason is not None:
            return reason
        from compacs.models.runtime import MODEL_FILES, SHIPPED

        missing = [name for name in MODEL_FILES if not (SHIPPED / name).exists()]
        if missing:
            return f"the shipped model lacks {', '.join(missing)}: reinstall compacs"
        return None


class Learned(ShippedModel, Codec):
    name = "learned"
    transfer_syntax_uid = TRANSFER_SYNTAX_UID
    lossless = True  # with the default delta = 0; see lossless_for
    allowed_params = ("delta",)
    description = "learned integer-exact PixelCNN, lossless or max |error| ≤ delta (private)"

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        parse_delta(params)

    def lossless_for(self, params: dict[str, Any]) -> bool:
        """True only for δ = 0: any δ > 0 result is lossy in DICOM's sense (invariant 3)."""
        return parse_delta(params) == 0

    def error_bound(self, params: dict[str, Any]) -> int:
        return parse_delta(params)

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return unsupported_reason(fmt)

    # --- coding -----------------------------------------------------------------------------

    def encode_frame(self, frame: np.ndarray, fmt: PixelFormat, **params: Any) -> bytes:
        return self.encode_frames([frame], fmt, **params)[0]

    def decode_frame(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        return self.decode_frames([data], fmt)[0]

    def encode_frames(
        self, frames: list[np.ndarray], fmt: PixelFormat, **params: Any
    ) -> list[bytes]:
        """Encode frames of one format; for δ > 0 their tiles share the wavefront steps."""
        from compacs.models import wavefront
        from compacs.models.features import ImageStats, tile_slices

        self.check_params(params)
        delta = parse_delta(params)
        reason = self.unsupported_reason(fmt)
        if reason:
            raise ValueError(f"learned codec cannot take this image: {reason}")
        model = self.model
        slices = tile_slices(fmt.rows, fmt.columns)
        jobs = []  # (frame index, tile slices, header, tile pixels)
        for f, frame in enumerate(frames):
            if frame.shape != (fmt.rows, fmt.columns):
                raise ValueError(f"frame shape {frame.shape} does not match {fmt}")
            x = frame.astype(np.int64)
            for rs, cs in slices:
                tile = x[rs, cs]
                jobs.append((f, (rs, cs), wavefront.TileHeader(ImageStats.of(tile), delta), tile))
        payloads: list[np.ndarray | None] = [None] * len(jobs)
        recon = [frame.astype(np.int64) for frame in frames]
        if delta == 0:
            for k, (_, _, header, tile) in enumerate(jobs):
                payloads[k] = wavefront.encode_lossless(model, header, tile)
        else:
            for group in _by_shape(jobs):
                headers = [jobs[k][2] for k in group]
                coded, rec = wavefront.encode_closed_loop(
                    model, headers, np.stack([jobs[k][3] for k in group])
                )
                for k, payload, tile in zip(group, coded, rec, strict=True):
                    payloads[k] = payload
                    f, (rs, cs) = jobs[k][0], jobs[k][1]
                    recon[f][rs, cs] = tile
        out = []
        for f in range(len(frames)):
            mine = [k for k, job in enumerate(jobs) if job[0] == f]
            digest = checksum(recon[f].astype(fmt.dtype))
            head = _HEADER.pack(
                MAGIC,
                VERSION,
                model.model_id,
                delta,
                fmt.rows,
                fmt.columns,
                _tile_size(),
                len(mine),
                digest,
            )
            records = b"".join(
                _TILE.pack(
                    h.stats.lo,
                    h.stats.hi,
                    h.stats.d,
                    h.stats.base,
                    h.scale_offset,
                    payloads[k].nbytes,
                )
                for k in mine
                for h in [jobs[k][2]]
            )
            body = b"".join(payloads[k].astype("<u4").tobytes() for k in mine)
            out.append(head + records + body)
        return out

    def decode_frames(self, datas: list[bytes], fmt: PixelFormat) -> list[np.ndarray]:
        """Decode frames of one format; all their tiles of one shape decode as one batch."""
        from compacs.models import wavefront
        from compacs.models.features import ImageStats, tile_slices
        from compacs.models.runtime import model_for

        model = self.model
        if datas and len(datas[0]) >= _HEADER.size:
            # A model retired by an upgrade still decodes what it stored.
            model = model_for(_HEADER.unpack_from(bytes(datas[0]))[2], model) or model
        slices = tile_slices(fmt.rows, fmt.columns)
        jobs = []  # (frame, slices, header, payload)
        digests = []
        for f, data in enumerate(datas):
            header, tiles = self._parse(bytes(data), fmt, model.model_id, len(slices))
            digests.append(header[-1])
            for (rs, cs), (lo, hi, d, base, offset, payload) in zip(slices, tiles, strict=True):
                h = wavefront.TileHeader(ImageStats(lo, hi, d, base), header[3])
                if h.scale_offset != offset:
                    raise ValueError("learned codec: tile header disagrees with its delta")
                jobs.append((f, (rs, cs), h, payload))
        frames = [np.zeros((fmt.rows, fmt.columns), dtype=np.int64) for _ in datas]
        for group in _by_shape(jobs):
            rs, cs = jobs[group[0]][1]
            try:
                rec, _ = wavefront.decode(
                    model,
                    [jobs[k][2] for k in group],
                    [jobs[k][3] for k in group],
                    rs.stop - rs.start,
                    cs.stop - cs.start,
                )
            except AssertionError:
                raise undecodable("learned-codec bitstream") from None
            for k, tile in zip(group, rec, strict=True):
                frames[jobs[k][0]][jobs[k][1]] = tile
        out = []
        for frame, digest in zip(frames, digests, strict=True):
            result = frame.astype(fmt.dtype)
            if checksum(result) != digest:
                raise ValueError(
                    "learned codec: the decoded frame does not match the checksum its encoder "
                    "stored (corrupt data, or a decoder that computes differently): do not use it"
                )
            out.append(result)
        return out

    @staticmethod
    def _parse(data: bytes, fmt: PixelFormat, model_id: bytes, n_tiles: int):
        if len(data) < _HEADER.size or data[:4] != MAGIC:
            raise ValueError("not a learned-codec bitstream (bad magic)")
        header = _HEADER.unpack_from(data)
        _, version, made_by, _delta, rows, columns, tile, count, _digest = header
        check_version("learned-codec bitstream", version, VERSION)
        if made_by != model_id:
            raise unknown_model("learned-codec bitstream", made_by, model_id)
        if (rows, columns) != (fmt.rows, fmt.columns) or tile != _tile_size() or count != n_tiles:
            raise ValueError(
                f"learned-codec frame {rows}x{columns} in {count} tiles of {tile} "
                f"does not match {fmt.rows}x{fmt.columns}"
            )
        records, pos = unpack_records(data, _HEADER.size, _TILE, count, "learned-codec bitstream")
        tiles = []
        for lo, hi, d, base, offset, nbytes in records:
            words = payload_words(data, pos, nbytes, "learned-codec bitstream")
            tiles.append((lo, hi, d, base, offset, words))
            pos += nbytes
        # DICOM pads an encapsulated fragment to an even length with one zero byte
        if pos != len(data) and not (len(data) == pos + 1 and data[-1] == 0):
            raise ValueError(f"learned-codec bitstream has {len(data) - pos} bytes too many/few")
        return header, tiles


def _tile_size() -> int:
    from compacs.models.features import TILE

    return TILE


def _by_shape(jobs: list[tuple]) -> list[list[int]]:
    """Indices of jobs grouped by tile shape: each group is one wavefront batch."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, job in enumerate(jobs):
        rs, cs = job[1]
        groups[(rs.stop - rs.start, cs.stop - cs.start)].append(k)
    return list(groups.values())
