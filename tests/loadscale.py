"""How big the load, fault and fuzz tests run: COMPACS_LOAD_SCALE (default 1).

Why one knob: CI on 2 cores gives these tests about three minutes in all, while the figures
docs/robustness.md reports come from the same tests at the issue's sizes (scale 10: 8 × 250
instances, 10 × the fuzz examples). One variable keeps the short run and the long run the same
code, so the long run checks what CI checks.
"""

from __future__ import annotations

import os


def load_scale() -> float:
    """COMPACS_LOAD_SCALE as a positive number; a wrong value says what is expected."""
    raw = os.environ.get("COMPACS_LOAD_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(
            f"COMPACS_LOAD_SCALE={raw!r} is not a number: give e.g. 1 (CI) or 10 (the "
            "issue's 8 x 250 instances)"
        ) from None
    if scale <= 0:
        raise ValueError(f"COMPACS_LOAD_SCALE={raw!r} must be above 0 (1: CI, 10: long run)")
    return scale


def scaled(base: int) -> int:
    """``base`` times the scale, at least 1."""
    return max(1, round(base * load_scale()))
