"""How often an association's network thread looks at its socket while we answer a request.

pynetdicom's DUL thread sleeps 1 ms whenever one pass found nothing to do. A C-GET/C-MOVE
sub-operation waits for the peer's C-STORE response, so that sleep adds up to a millisecond
per object: C-GET of 300 CT slices went from 101 to 106 images/s with 0.1 ms polling while
retrieving. (C-FIND answers measured no gain: their 1.4 ms each is CPU.) Idle associations
keep pynetdicom's 1 ms, which costs no CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BUSY_POLL_SECONDS = 0.0001


def poll_fast(assoc: Any) -> float | None:
    """Switch `assoc` to fast polling; returns the previous delay (None if not applicable)."""
    dul = getattr(assoc, "dul", None)
    previous = getattr(dul, "_run_loop_delay", None)
    if previous is not None:
        dul._run_loop_delay = BUSY_POLL_SECONDS
    return previous


@contextmanager
def fast_polling(assoc: Any) -> Iterator[None]:
    """Fast polling for the duration of one request."""
    previous = poll_fast(assoc)
    try:
        yield
    finally:
        if previous is not None:
            assoc.dul._run_loop_delay = previous
