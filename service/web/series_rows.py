"""The index rows of the series a viewer is reading, kept a few seconds so that its frame
requests, one per instance, cost no index read each.

Why: a web viewer loads a series as one frame request per instance, hundreds in a row, and
a read of one row by its SOP Instance UID was the largest part of a frame's time on the
server (bench/dicomweb.py: about a third). The first frame request of a series reads all its
rows in one statement; the next ones find theirs here.

Why a few seconds are safe: a row read earlier may name a blob that has been replaced since
(compressed, moved to another tier). Its file is then either still there (released blobs
are deleted only after [storage] delete_grace_seconds), and holds the same pixels in the
syntax the old row says, or gone, and the archive service reads the row again
(ArchiveService.read_instance). An instance stored after the series was read is not here:
it is read on its own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from compacs.service.storage.schema import Instance

KEEP_SECONDS = 5.0
KEEP_SERIES = 32  # a viewer shows a few series at once; a study list many, one frame each


class SeriesRows:
    def __init__(
        self,
        load: Callable[[str], list[Instance]],
        keep_seconds: float = KEEP_SECONDS,
        keep_series: int = KEEP_SERIES,
    ) -> None:
        self._load = load
        self._keep_seconds = keep_seconds
        self._keep_series = keep_series
        self._series: OrderedDict[str, tuple[float, dict[str, Instance]]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading = threading.Lock()

    def get(self, series_uid: str, sop_uid: str) -> Instance | None:
        """The row of `sop_uid` if it belongs to `series_uid` as read within keep_seconds
        (the series is read now if it was not); None: not in that series when it was read."""
        held = self.held(series_uid)
        if held is not None:
            return held.get(sop_uid)
        with self._loading:  # a viewer's 6 connections miss at once: one read, not six
            held = self.held(series_uid)
            if held is not None:
                return held.get(sop_uid)
            now = time.monotonic()
            rows = {inst.sop_instance_uid: inst for inst in self._load(series_uid)}
            with self._lock:
                self._series[series_uid] = (now, rows)
                while len(self._series) > self._keep_series:
                    self._series.popitem(last=False)
        return rows.get(sop_uid)

    def held(self, series_uid: str) -> dict[str, Instance] | None:
        """The rows of a series read within keep_seconds, by SOP Instance UID; None when
        they would have to be read."""
        with self._lock:
            held = self._series.get(series_uid)
            if held is None or time.monotonic() - held[0] >= self._keep_seconds:
                return None
            self._series.move_to_end(series_uid)
            return held[1]
