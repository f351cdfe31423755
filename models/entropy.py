"""Entropy coding of the learned codec: fixed integer tables, coded with `constriction`.

Why fixed integer tables: a coder that computes its CDF from the network's float outputs decodes
only on the machine that encoded (CompressAI #279/#309). Here the network outputs integers (a
mean and a scale index, models/features.py), every probability comes from an integer table
shipped with the model, and constriction's range coder gets those integers (as exact floats), so
every machine builds the same models.

A pixel's (quantised) residual q to its predicted mean is coded as a bucket `q >> k` from a
129-bucket table for its scale, an escape symbol for the tails (then q itself, uniformly over
17 bits), and the k low bits of q uniformly. k grows with the scale so that a bucket is at most
a quarter of σ wide: the logistic is nearly flat within a bucket, so the uniform low bits cost
almost nothing, and 129 buckets cover ±16σ whatever the bit depth.

The tables are built once at export (`build_tables`, float maths) and loaded as integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from .features import N_SCALES, sigma_of_index

HALF_BUCKETS = 64
N_SYMBOLS = 2 * HALF_BUCKETS + 2  # buckets -64..64, then the escape
ESCAPE = N_SYMBOLS - 1
ESCAPE_BITS = 17  # q + 2**16 for |q| < 2**16: every 16-bit residual
TABLE_PRECISION = 1 << 20


def build_tables() -> tuple[np.ndarray, np.ndarray]:
    """(frequencies (N_SCALES, N_SYMBOLS) int32, low-bit counts k (N_SCALES,) int32)."""
    freqs = np.zeros((N_SCALES, N_SYMBOLS), dtype=np.int64)
    lows = np.zeros(N_SCALES, dtype=np.int64)
    b = np.arange(-HALF_BUCKETS, HALF_BUCKETS + 1, dtype=np.float64)
    for s in range(N_SCALES):
        sigma = float(sigma_of_index(s))
        k = max(0, int(np.floor(np.log2(sigma))) - 2)
        width = float(1 << k)

        def cdf(v: np.ndarray, sigma: float = sigma) -> np.ndarray:
            return 0.5 * (1.0 + np.tanh(v / (2.0 * sigma)))  # logistic CDF

        p = cdf((b + 1) * width - 0.5) - cdf(b * width - 0.5)
        tail = (
            cdf(np.array(-HALF_BUCKETS * width - 0.5))
            + 1
            - cdf(np.array((HALF_BUCKETS + 1) * width - 0.5))
        )
        freqs[s, :-1] = np.maximum(1, np.round(p * TABLE_PRECISION))
        freqs[s, -1] = max(1, round(float(tail) * TABLE_PRECISION))
        lows[s] = k
    return freqs.astype(np.int32), lows.astype(np.int32)


@dataclass(frozen=True)
class Tables:
    freqs: np.ndarray  # int32 (N_SCALES, N_SYMBOLS)
    lows: np.ndarray  # int32 (N_SCALES,)

    def __post_init__(self) -> None:
        # constriction takes float64 probabilities; integers below 2**53 convert exactly.
        object.__setattr__(self, "_probs", self.freqs.astype(np.float64))
        object.__setattr__(self, "_totals", self._probs.sum(axis=1))  # type: ignore[attr-defined]

    def probabilities(self, index: np.ndarray) -> np.ndarray:
        return self._probs[index]  # type: ignore[attr-defined]

    def totals(self) -> np.ndarray:
        """Each table's sum of frequencies (constriction normalises by it)."""
        return self._totals  # type: ignore[attr-defined]


_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_UNIFORM = constriction.stream.model.Uniform()


def _split(q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bucket = q >> k
    escaped = np.abs(bucket) > HALF_BUCKETS
    symbols = np.where(escaped, ESCAPE, bucket + HALF_BUCKETS)
    return symbols.astype(np.int32), escaped, (q - (bucket << k)).astype(np.int32)


def encode(
    coder: constriction.stream.queue.RangeEncoder, q: np.ndarray, index: np.ndarray, tables: Tables
) -> None:
    """Append residuals q (int64) with table indices `index` to `coder`, in `decode`'s order."""
    k = tables.lows[index].astype(np.int64)
    symbols, escaped, low = _split(q, k)
    coder.encode(symbols, _CATEGORICAL, tables.probabilities(index))
    if escaped.any():
        payload = (q[escaped] + (1 << (ESCAPE_BITS - 1))).astype(np.int32)
        coder.encode(payload, _UNIFORM, np.full(len(payload), 1 << ESCAPE_BITS, dtype=np.int32))
    has_low = (k > 0) & ~escaped
    if has_low.any():
        coder.encode(low[has_low], _UNIFORM, (1 << k[has_low]).astype(np.int32))


def code_length(q: np.ndarray, index: np.ndarray, tables: Tables) -> float:
    """Bits that `encode` would spend on residuals q with table indices `index`, to within the
    range coder's few bits of overhead: what an encoder compares when it picks parameters."""
    k = tables.lows[index].astype(np.int64)
    symbols, escaped, _ = _split(q, k)
    freqs = tables.freqs[index, symbols].astype(np.float64)
    totals = tables.totals()[index]
    extra = np.where(escaped, ESCAPE_BITS, k).sum()
    return float(np.log2(totals / freqs).sum() + extra)


def decode(
    coder: constriction.stream.queue.RangeDecoder, index: np.ndarray, tables: Tables
) -> np.ndarray:
    """The residuals that `encode` appended for table indices `index` (int64)."""
    k = tables.lows[index].astype(np.int64)
    symbols = coder.decode(_CATEGORICAL, tables.probabilities(index)).astype(np.int64)
    escaped = symbols == ESCAPE
    q = (symbols - HALF_BUCKETS) << k
    if escaped.any():
        n = int(escaped.sum())
        sizes = np.full(n, 1 << ESCAPE_BITS, dtype=np.int32)
        q[escaped] = coder.decode(_UNIFORM, sizes).astype(np.int64) - (1 << (ESCAPE_BITS - 1))
    has_low = (k > 0) & ~escaped
    if has_low.any():
        q[has_low] += coder.decode(_UNIFORM, (1 << k[has_low]).astype(np.int32))
    return q
