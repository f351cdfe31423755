"""Wavefront coding: the decoder (and the δ > 0 encoder) of the learned codec.

Pixel (i, j) is decoded at step t = 4i + j. That is the earliest step at which everything its
prediction reads is known: the mask-A 7×7 layer reads pixels up to 3 columns to the right in
the rows above (t - 1 at the latest), and each mask-B 3×3 layer reads its input up and to the
right by one (computed 3 steps earlier). Every layer's activations are cached per pixel, so a
step computes each layer only for the pixels on its wavefront: 4(H-1) + W steps of one small
`step.onnx` call, instead of H·W runs of the whole network (205 s against ~1 s, docs/design.md).

A batch of tiles of one shape (the tiles of a large image, the slices of a series) decodes as
one batch per step, so the step calls grow wider rather than more numerous: that is what a GPU
wants, and it is the same code on a CPU.

The δ = 0 encoder runs the whole-image network instead (every context is known) and only codes
in this order; δ > 0 needs the reconstruction as context (closed loop), so it walks the same
schedule as the decoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import constriction
import numpy as np

from . import entropy
from .features import (
    N_FEATURES,
    N_SCALES,
    SCALE_STEPS,
    ImageStats,
    image_features,
    med,
    med_prediction,
    pixel_features,
)
from .runtime import Model

LAG = 4  # columns per row of the wavefront
RING = 8  # cached columns per row: > the 5 between a row's newest write and its oldest read


def schedule(rows: int, columns: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(i, j) of the pixels of each step, i ascending. A tile narrower than LAG columns has
    times t with no pixel: they are left out (no step may be empty), which keeps the order
    of every pixel after everything it reads."""
    steps = []
    for t in range(LAG * (rows - 1) + columns):
        i = np.arange(max(0, -(-(t - columns + 1) // LAG)), min(rows - 1, t // LAG) + 1)
        if len(i):
            steps.append((i, t - LAG * i))
    return steps


@dataclass(frozen=True)
class TileHeader:
    """What a tile's decoder needs before its first pixel (stored in the bitstream)."""

    stats: ImageStats
    delta: int

    @property
    def step(self) -> int:
        return 2 * self.delta + 1

    @property
    def scale_offset(self) -> int:
        """Quantising by 2δ+1 divides the residual's scale by it: so many table indices down."""
        return int(round(SCALE_STEPS * np.log2(self.step)))


def quantise(e: np.ndarray, delta: int) -> np.ndarray:
    """JPEG-LS NEAR quantisation of residuals: |e - q(2δ+1)| ≤ δ."""
    return np.sign(e) * ((np.abs(e) + delta) // (2 * delta + 1))


class TileValues(NamedTuple):
    """Header values of the tiles of a batch (or, per step, of each pixel's tile)."""

    lo: np.ndarray
    hi: np.ndarray
    d: np.ndarray
    base: np.ndarray
    step: np.ndarray
    offset: np.ndarray
    delta: np.ndarray


def _values(h: TileHeader) -> tuple[int, ...]:
    s = h.stats
    return s.lo, s.hi, s.d, s.base, h.step, h.scale_offset, h.delta


class Step(NamedTuple):
    """The pixels (tile bb, row ii, column jj) of one wavefront step, each tile's share of
    them (parts) and their tiles' header values."""

    bb: np.ndarray
    ii: np.ndarray
    jj: np.ndarray
    parts: list[slice]
    tiles: TileValues


class Batch:
    """Wavefront state for B tiles of one shape: reconstruction, features, cached activations."""

    def __init__(self, model: Model, headers: list[TileHeader], rows: int, columns: int):
        self.model, self.headers, self.rows, self.columns = model, headers, rows, columns
        b = len(headers)
        columns_of = zip(*map(_values, headers), strict=True)
        self.tiles = TileValues(*(np.array(v, dtype=np.int64) for v in columns_of))
        self._by_width: dict[int, TileValues] = {}
        self.recon = np.empty((b, rows + 1, columns + 1), dtype=np.int64)
        self.recon[:] = self.tiles.lo[:, None, None]  # `lo` outside the image (features.py)
        # Features and cached activations are kept as 2-D tables, one row per padded pixel,
        # so that a step gathers its neighbourhoods with one `take` each (fancy indexing into
        # the 5-D arrays cost three times the network itself).
        self.fshape = (b, rows + 3, columns + 6)  # padded 3 above, left and right (7×7)
        self.feats = np.zeros((int(np.prod(self.fshape)), N_FEATURES), dtype=np.float32)
        # A row's activations are read by the next row 4 to 6 columns later (the lag), so
        # each cached row is a ring of RING columns: memory per tile is rows·RING·L·C floats,
        # not rows·columns·L·C (211 MB for one 512² tile, 4 GB for a 20-slice batch). The
        # cache is layer-major, (L, pixel, C), because that is the step graph's input and
        # output layout: a step reads and writes it without a transpose. Its last row stays
        # zero: neighbours left and right of the image read it (the convolutions' padding).
        self.cshape = (b, rows + 1, RING)  # padded 1 above (row 0 stays zero)
        layers, channels = model.blocks, model.channels
        self.zero_row = int(np.prod(self.cshape))
        self.cache = np.zeros((layers, self.zero_row + 1, channels), dtype=np.float32)
        taps = np.array(model.first_taps)
        self.ftaps = taps[:, 0] * self.fshape[2] + taps[:, 1]
        block = np.array(model.meta["block_taps"])
        self.brow, self.bcol = block[:, 0] * RING, block[:, 1] - 1
        self.trace: np.ndarray | None = None

    def predict(self, step: Step):
        """Run the network for the pixels of one step; cache their activations."""
        bb, ii, jj, t = step.bb, step.ii, step.jj, step.tiles
        n_px = len(bb)
        corner = (bb * self.fshape[1] + ii) * self.fshape[2] + jj  # (i-3, j-3) in padded rows
        feat = self.feats.take(corner[:, None] + self.ftaps, axis=0).reshape(n_px, -1)
        above = (bb * self.cshape[1] + ii) * RING  # padded row i: image row i-1
        cols = jj[:, None] + self.bcol
        inside = (cols >= 0) & (cols < self.columns)
        rows = np.where(inside, above[:, None] + self.brow + cols % RING, self.zero_row)
        nb = self.cache.take(rows, axis=1).reshape(self.model.blocks, n_px, -1)  # (L, n, 4·C)
        h, acc = self.model.run_step(feat, nb)
        self.cache[:, above + RING + jj % RING] = h
        if self.trace is not None:
            self.trace[bb, ii, jj] = acc
        flat, width = self.recon.reshape(-1), self.columns + 1
        nw_at = (bb * (self.rows + 1) + ii) * width + jj
        w, n, nw = flat[nw_at + width], flat[nw_at + 1], flat[nw_at]
        prediction = med(w, n, nw)
        mean, index = self.model.predictions(acc, prediction, t.lo, t.hi, t.d, t.base)
        index = np.minimum(np.maximum(index - t.offset, 0), N_SCALES - 1)
        return mean, index, (w, n, nw, prediction)

    def commit(self, step: Step, x: np.ndarray, neighbours) -> None:
        """Store reconstructed pixels and their features, the context of later steps."""
        bb, ii, jj, t = step.bb, step.ii, step.jj, step.tiles
        w, n, nw, prediction = neighbours
        width = self.columns + 1
        self.recon.reshape(-1)[(bb * (self.rows + 1) + ii + 1) * width + jj + 1] = x
        self.feats[((bb * self.fshape[1] + ii + 3) * self.fshape[2]) + jj + 3] = pixel_features(
            x, w, n, nw, t.lo, t.hi, t.d, prediction
        )

    def reconstructed(self, step: Step, mean: np.ndarray, q: np.ndarray) -> np.ndarray:
        t = step.tiles
        return np.minimum(np.maximum(mean + q * t.step, t.lo), t.hi)

    def steps(self, lags: list[int] | None = None) -> Iterator[Step]:
        """The wavefront steps of the batch; with `lags`, tile b runs lags[b] steps behind
        (a tile may then have no pixels in a step: its part is empty)."""
        if lags is not None:
            yield from self._lagged_steps(lags)
            return
        b = len(self.headers)
        tiles = np.arange(b)
        for i, j in schedule(self.rows, self.columns):
            m = len(i)
            if b > 1:
                i, j = np.tile(i, b), np.tile(j, b)
            parts = [slice(k * m, (k + 1) * m) for k in range(b)]
            yield Step(tiles.repeat(m), i, j, parts, self._tile_values(m))

    def _lagged_steps(self, lags: list[int]) -> Iterator[Step]:
        """Why lags: a slice coded with the previous slice as context (interslice.py) reads
        that slice's pixel at the same position, which one step of lag has decoded."""
        plan = schedule(self.rows, self.columns)
        empty = np.zeros(0, dtype=np.int64)
        tiles = np.arange(len(self.headers))
        for t in range(len(plan) + max(lags)):
            ij = [plan[t - lag] if 0 <= t - lag < len(plan) else (empty, empty) for lag in lags]
            counts = np.array([len(i) for i, _ in ij])
            if not counts.any():
                continue  # lags with gaps: no tile has a pixel at this time
            ends = np.cumsum(counts)
            parts = [slice(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True)]
            values = TileValues(*(np.repeat(v, counts) for v in self.tiles))
            i = np.concatenate([i for i, _ in ij])
            j = np.concatenate([j for _, j in ij])
            yield Step(tiles.repeat(counts), i, j, parts, values)

    def _tile_values(self, m: int) -> TileValues:
        """Each tile's header values for a step of m pixels per tile. One tile (the common
        case) gets scalars: gathering them per pixel was a tenth of a slice's decode time."""
        values = self._by_width.get(m)
        if values is None:
            one = len(self.headers) == 1
            values = TileValues(*(v[0] if one else np.repeat(v, m) for v in self.tiles))
            self._by_width[m] = values
        return values

    def reconstruction(self) -> np.ndarray:
        return self.recon[:, 1:, 1:]


def decode(
    model: Model,
    headers: list[TileHeader],
    payloads: list[np.ndarray],
    rows: int,
    columns: int,
    trace: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode B same-shape tiles; returns (B, rows, columns) int64 and, with trace, the head
    accumulators of every pixel (B, rows, columns, 2), for the tests' comparison."""
    batch = Batch(model, headers, rows, columns)
    if trace:
        batch.trace = np.zeros((len(headers), rows, columns, 2), dtype=np.int64)
    coders = [constriction.stream.queue.RangeDecoder(p) for p in payloads]
    for step in batch.steps():
        mean, index, neighbours = batch.predict(step)
        q = [
            entropy.decode(c, index[s], model.tables)
            for c, s in zip(coders, step.parts, strict=True)
        ]
        x = batch.reconstructed(step, mean, q[0] if len(q) == 1 else np.concatenate(q))
        batch.commit(step, x, neighbours)
    return batch.reconstruction(), batch.trace


def encode_closed_loop(
    model: Model, headers: list[TileHeader], tiles: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Encode B same-shape tiles (B, rows, columns) with reconstruction as context (δ ≥ 0)."""
    _, rows, columns = tiles.shape
    batch = Batch(model, headers, rows, columns)
    coders = [constriction.stream.queue.RangeEncoder() for _ in headers]
    for step in batch.steps():
        mean, index, neighbours = batch.predict(step)
        q = quantise(tiles[step.bb, step.ii, step.jj] - mean, step.tiles.delta)
        for coder, s in zip(coders, step.parts, strict=True):
            entropy.encode(coder, q[s], index[s], model.tables)
        batch.commit(step, batch.reconstructed(step, mean, q), neighbours)
    return [c.get_compressed() for c in coders], batch.reconstruction()


def full_predictions(
    model: Model, header: TileHeader, tile: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head accumulators (H, W, 2), mean, scale index) of a tile, all pixels at once (δ = 0)."""
    stats = header.stats
    acc = model.run_full(image_features(tile, stats)[None])[0].transpose(1, 2, 0)
    mean, index = model.predictions(
        acc, med_prediction(tile, stats.lo), stats.lo, stats.hi, stats.d, stats.base
    )
    return acc, mean, index


def encode_lossless(model: Model, header: TileHeader, tile: np.ndarray) -> np.ndarray:
    """δ = 0: the whole-image network predicts every pixel; code them in wavefront order."""
    _, mean, index = full_predictions(model, header, tile)
    q = tile - mean
    coder = constriction.stream.queue.RangeEncoder()
    for i, j in schedule(*tile.shape):
        entropy.encode(coder, q[i, j], index[i, j], model.tables)
    return coder.get_compressed()
