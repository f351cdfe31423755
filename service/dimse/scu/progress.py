"""How a long SCU operation tells its caller how far it got, without knowing who shows it:
the CLI draws a progress bar, a later face may show a page or nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """Where a send or pull stands: `done` of `total` (None: not known yet), and a `note`
    worth showing now (a skipped file, a peer's last words); `failure`: the note is a
    failure that the operation's report lists again at the end."""

    done: int
    total: int | None
    note: str = ""
    failure: bool = False


Progress = Callable[[Step], None]


def tell(progress: Progress | None, step: Step) -> None:
    if progress is not None:
        progress(step)
