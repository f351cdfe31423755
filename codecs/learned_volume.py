"""The learned codec over a volume: each slice predicted by the network and by the slices
before it (models/interslice.py), lossless. Private transfer syntax: never sent to a peer.

Why a volume codec and not a parameter of `learned`: the previous slice is another frame
(of a multi-frame instance) or another instance (of a series), and only the volume path
(volume.py: multi-frame instances, series volumes on a tier with `form = "volume"`) sees
the frames of a volume together and keeps a random-access point every `gop_size` frames.
Within a group, a slice's pixel reads the same pixel of the two slices before it; a slice
with nothing to gain from them codes exactly as the single-slice codec would (its header
says so). Reading one slice decodes its whole group (one checksum covers the group), as one
lagged wavefront batch: on a CPU about a second per 512² slice, ~15 s for a group of 16
(docs/benchmarks.md), which is why `gop_size` stops at 32 here (memory: about 100 bytes per
pixel of the group while it decodes); a GPU runs the same batch far faster (not measured yet).

Group bytes (little endian): magic "CPXV", version, the model id (16 bytes), frame count,
tiles per frame, checksum of the group's samples; per frame its correction (a, b, c, o as
int8); per frame and tile (lo, hi, d, base scale, length); then the tiles' range-coder words.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .base import PixelFormat, int_param
from .learned import (
    ShippedModel,
    check_version,
    checksum,
    payload_words,
    undecodable,
    unknown_model,
    unpack_records,
    unsupported_reason,
)
from .volume import DEFAULT_GOP_SIZE, VolumeCodec

TRANSFER_SYNTAX_UID = "2.25.164530197483740761021022581188332038263"
MAGIC = b"CPXV"
VERSION = 1
_HEADER = struct.Struct("<4sB16sHH8s")
_PARAMS = struct.Struct("<bbbb")
_TILE = struct.Struct("<iiIHI")
MAX_GOP_SIZE = 32


class LearnedVolume(ShippedModel, VolumeCodec):
    name = "learnvol"  # the volume container keeps 8 bytes of a codec's name
    transfer_syntax_uid = TRANSFER_SYNTAX_UID
    lossless = True
    description = (
        "learned integer-exact PixelCNN over a volume, each slice predicted with the previous "
        "ones as context, lossless (private)"
    )
    coded_bits = (16,)

    def check_params(self, params: dict[str, Any]) -> None:
        super().check_params(params)
        int_param(self.name, params, "gop_size", DEFAULT_GOP_SIZE, range(1, MAX_GOP_SIZE + 1))

    def unsupported_reason(self, fmt: PixelFormat) -> str | None:
        return unsupported_reason(fmt)

    def encode_group(
        self, samples: np.ndarray, bits: int, fmt: PixelFormat, **params: Any
    ) -> bytes:
        from compacs.models import interslice

        model = self.model
        coded = interslice.encode(model, samples)
        tiles = len(coded.headers[0])
        head = _HEADER.pack(MAGIC, VERSION, model.model_id, len(samples), tiles, checksum(samples))
        corrections = b"".join(_PARAMS.pack(*p.coefs, p.offset) for p in coded.params)
        records = b"".join(
            _TILE.pack(h.stats.lo, h.stats.hi, h.stats.d, h.stats.base, payload.nbytes)
            for headers, payloads in zip(coded.headers, coded.payloads, strict=True)
            for h, payload in zip(headers, payloads, strict=True)
        )
        words = b"".join(p.astype("<u4").tobytes() for ps in coded.payloads for p in ps)
        return head + corrections + records + words

    def decode_group(self, data: bytes, count: int, bits: int, fmt: PixelFormat) -> np.ndarray:
        from compacs.models import interslice
        from compacs.models.features import ImageStats, tile_slices
        from compacs.models.runtime import model_for
        from compacs.models.wavefront import TileHeader

        if len(data) < _HEADER.size or data[:4] != MAGIC:
            raise ValueError("not a learned volume group (bad magic)")
        what = "learned volume group"
        _, version, made_by, frames, tiles, digest = _HEADER.unpack_from(data)
        check_version(what, version, VERSION)
        model = model_for(made_by, self.model)
        if model is None:
            raise unknown_model(what, made_by, self.model.model_id)
        if frames != count or tiles != len(tile_slices(fmt.rows, fmt.columns)):
            raise ValueError(
                f"learned volume group holds {frames} frames of {tiles} tiles, expected "
                f"{count} frames of {fmt.rows}x{fmt.columns}"
            )
        params, pos = unpack_records(data, _HEADER.size, _PARAMS, frames, what)
        records, pos = unpack_records(data, pos, _TILE, frames * tiles, what)
        corrections = [interslice.SliceParams((a, b, c), o) for a, b, c, o in params]
        headers, payloads = [], []
        for f in range(frames):
            headers.append([])
            payloads.append([])
            for lo, hi, d, base, nbytes in records[f * tiles : (f + 1) * tiles]:
                headers[-1].append(TileHeader(ImageStats(lo, hi, d, base), 0))
                payloads[-1].append(payload_words(data, pos, nbytes, what))
                pos += nbytes
        if pos != len(data):
            raise ValueError(f"{what} has {len(data) - pos} bytes too many/few")
        coded = interslice.CodedSlices(corrections, headers, payloads)
        try:
            samples = interslice.decode(model, coded, fmt.rows, fmt.columns)
        except AssertionError:
            raise undecodable(what) from None
        out = samples.astype("<u2")  # coded_bits: 16, as encode_volume gave them
        if checksum(out) != digest:
            raise ValueError(
                "learned volume: the decoded group does not match the checksum its encoder "
                "stored (corrupt data, or a decoder that computes differently): do not use it"
            )
        return out
