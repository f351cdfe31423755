"""Codec plugins for tests/test_problems.py: a real codec that kills its process, and one
that holds its worker until the test lets it go.

A test puts this folder on the node's PYTHONPATH, so that Python imports this module at start
in the node and in each of its spawned compression workers. It registers two JPEG-LS codecs:

- `crashtest` ends its process with os._exit on every encode, as a native codec that
  segfaults or a worker the out-of-memory killer ends would: the pool sees a worker die
  mid-job;
- `crashmarked` does so only on a frame whose first two pixels are 4242 and -4242 (the
  marked object, for a tier's codec list, which has no rule to pick one object), and
  encodes as jpegls otherwise;
- `holdtest` waits until the file named by $CRASHTEST_RELEASE exists, then encodes as
  jpegls: an innocent job that is surely running beside the crashing one.

Test rules send marked objects (by calling AE title) to them; every other object gets jpegls.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from compacs.codecs import registry
from compacs.codecs.jpegls import JpegLS

MARK = 4242


class CrashTest(JpegLS):
    name = "crashtest"
    description = "test plugin: ends its worker process on every encode"

    def encode_frame(self, frame: Any, fmt: Any, **params: Any) -> bytes:
        os._exit(70)


class CrashMarked(JpegLS):
    name = "crashmarked"
    description = "test plugin: ends its worker process on a marked frame"

    def encode_frame(self, frame: Any, fmt: Any, **params: Any) -> bytes:
        if frame.ndim >= 2 and int(frame[0, 0]) == MARK and int(frame[0, 1]) == -MARK:
            os._exit(70)
        return super().encode_frame(frame, fmt, **params)


class HoldTest(JpegLS):
    name = "holdtest"
    description = "test plugin: jpegls once $CRASHTEST_RELEASE exists"

    def encode_frame(self, frame: Any, fmt: Any, **params: Any) -> bytes:
        release = Path(os.environ["CRASHTEST_RELEASE"])
        deadline = time.monotonic() + 300  # never hang a test run for ever
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().encode_frame(frame, fmt, **params)


registry.register(CrashTest())
registry.register(CrashMarked())
registry.register(HoldTest())
