"""Per-image statistics and the integer input features of the learned codec's network.

Training, the full-image encoder and the wavefront decoder all compute features here, in
integer numpy arithmetic, so that what the network saw in training is exactly what it sees
when coding, on any machine. Why these features: a bare causal CNN on raw intensities learns
the classical predictors slowly from ~95 MB of data; handing it the MED (LOCO-I) residual and
the horizontal and vertical differences, in units of the image's own noise level, is what made
the feasibility model beat JPEG-XL (docs/design.md, "The learned codec").

Pixels outside the image are the image minimum `lo`: MED then predicts W on the first row,
N in the first column and `lo` for the first pixel, as JPEG-LS does, with no special cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A feature's real value is its integer divided by 2**FEATURE_SHIFT: residuals up to
# 127/8 ≈ 16 times the image's mean residual are seen unclipped.
FEATURE_SHIFT = 3
N_FEATURES = 4
# The network's scale output is in 1/SCALE_STEPS octaves relative to the image's noise level;
# the coding tables are indexed the same way, from SIGMA_MIN upwards.
SCALE_STEPS = 8
SIGMA_MIN_LOG2 = -4
N_SCALES = 160  # SIGMA_MIN * 2**(160/8) = 65536: covers every 16-bit image


@dataclass(frozen=True)
class ImageStats:
    """What the decoder must know about an image (tile) before the first pixel: in the header."""

    lo: int
    hi: int
    d: int  # mean |MED residual|, rounded up, at least 1: the unit of the residual features
    base: int  # scale index of d: the network's scale output is relative to it

    @classmethod
    def of(cls, x: np.ndarray) -> ImageStats:
        x = x.astype(np.int64, copy=False)
        lo, hi = int(x.min()), int(x.max())
        med = med_prediction(x, lo)
        d = max(1, int(np.ceil(np.abs(x - med).mean())))
        return cls(lo, hi, d, base_index(d))


def base_index(d: int) -> int:
    """Scale index nearest to d; float log2 is fine here because the header carries the result."""
    return int(np.clip(round(SCALE_STEPS * (np.log2(d) - SIGMA_MIN_LOG2)), 0, N_SCALES - 1))


def med(w: np.ndarray, n: np.ndarray, nw: np.ndarray) -> np.ndarray:
    """LOCO-I's median edge detector on integer arrays."""
    hi = np.maximum(w, n)
    lo = np.minimum(w, n)
    return np.where(nw >= hi, lo, np.where(nw <= lo, hi, w + n - nw))


def neighbours(x: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W, N and NW of every pixel of `x` (..., H, W), with `lo` outside the image."""
    pad = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)], constant_values=lo)
    return pad[..., 1:, :-1], pad[..., :-1, 1:], pad[..., :-1, :-1]


def med_prediction(x: np.ndarray, lo: int) -> np.ndarray:
    w, n, nw = neighbours(x, lo)
    return med(w, n, nw)


def pixel_features(
    x: np.ndarray,
    w: np.ndarray,
    n: np.ndarray,
    nw: np.ndarray,
    lo: np.ndarray | int,
    hi: np.ndarray | int,
    d: np.ndarray | int,
    prediction: np.ndarray | None = None,
) -> np.ndarray:
    """The 4 int features of pixels with values x and causal neighbours w, n, nw; last axis.

    Shared by the whole-image path and the wavefront decoder, which calls it on the few
    pixels it has just decoded (lo, hi, d then per pixel, from each pixel's tile, and the
    MED `prediction` it already has): one definition, so the two cannot drift apart. Written
    into one array and clamped with ufuncs: np.stack and np.clip were half of its cost at a
    wavefront step's hundred pixels.
    """
    if prediction is None:
        prediction = med(w, n, nw)
    span = np.maximum(np.asarray(hi) - lo, 1)
    scale = 1 << FEATURE_SHIFT
    out = np.empty((*np.shape(x), N_FEATURES), dtype=np.int64)
    np.floor_divide((x - lo) * 127, span, out=out[..., 0])
    np.floor_divide((x - prediction) * scale, d, out=out[..., 1])
    np.floor_divide((x - w) * scale, d, out=out[..., 2])
    np.floor_divide((x - n) * scale, d, out=out[..., 3])
    return np.minimum(np.maximum(out, -127, out=out), 127, out=out)


def image_features(x: np.ndarray, stats: ImageStats) -> np.ndarray:
    """Features of every pixel of x (H, W) as int8, shape (H, W, 4)."""
    x = x.astype(np.int64, copy=False)
    w, n, nw = neighbours(x, stats.lo)
    return pixel_features(x, w, n, nw, stats.lo, stats.hi, stats.d).astype(np.int8)


def scale_index(base: int, level: np.ndarray) -> np.ndarray:
    """The coding table a pixel uses: the image's base index plus the network's level."""
    return np.minimum(np.maximum(base + level, 0), N_SCALES - 1)


def sigma_of_index(index: np.ndarray | int) -> np.ndarray:
    return 2.0 ** (SIGMA_MIN_LOG2 + np.asarray(index, dtype=np.float64) / SCALE_STEPS)


TILE = 512  # images larger than this are coded (and trained on) as independent tiles


def tile_slices(rows: int, columns: int, size: int = TILE) -> list[tuple[slice, slice]]:
    """The tiles of an image in raster order: independent coding units, at most size² each."""
    return [
        (slice(r, min(r + size, rows)), slice(c, min(c + size, columns)))
        for r in range(0, rows, size)
        for c in range(0, columns, size)
    ]
