"""Fixity: blobs are re-read on a schedule, checked against the checksum recorded when they
were written, and decoded; each result goes to the index (blob.verified_at, fixity_error).

A failure is logged as an error naming the blob and what is wrong, and shown by
`compacs tier status` and `compacs verify`: bit rot on a cold tier is found before a reader
needs the object. Blobs checked longest ago (never checked first) come first; a run stops
after `limit` blobs or `budget_seconds`, and paces itself to `[tiering] cpu_share`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import dcmread
from tqdm import tqdm

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service import metrics
from compacs.service.compress import NOT_A_CODEC_FAILURE, source_frames
from compacs.service.storage.archive import checksum
from compacs.service.storage.schema import KIND_VOLUME
from compacs.service.tiering import volumes

log = logging.getLogger("compacs.fixity")


@dataclass
class FixityReport:
    checked: int = 0
    failed: list[str] = field(default_factory=list)


class ChecksumMismatch(ValueError):
    """The blob is not what was written: never excused, whatever the index flags."""


def check_blob(data: bytes, expected: str, kind: str) -> None:
    """Raise, saying what is wrong, unless `data` has its checksum and decodes."""
    if checksum(data) != expected:
        raise ChecksumMismatch(f"checksum mismatch (expected {expected})")
    if kind == KIND_VOLUME:
        start, length = volumes.codestream_span(data[:13])
        stream = memoryview(data)[start : start + length]
        header = dcmread(BytesIO(data[start + length :]), stop_before_pixels=True)
        fmt = PixelFormat.from_dataset(header)
        codec = registry.get_volume(_volume_codec(stream))
        codec.decode_frames(stream, fmt)
        return
    ds = dcmread(BytesIO(data))
    if "PixelData" in ds:
        source_frames(ds)


def _volume_codec(stream: memoryview) -> str:
    from compacs.codecs.volume import read_header

    return read_header(stream).codec


def run(service: Any, *, limit: int = 1000, progress: bool = False) -> FixityReport:
    report = FixityReport()
    share = service.tiering.cpu_share
    due = service.fixity_due(limit)
    for blob_pk, tier, path, digest, kind in tqdm(due, desc="fixity", disable=not progress):
        begun = time.monotonic()
        error = None
        try:
            check_blob(service.archive_for(tier).read(path), digest, kind)
        except BaseException as exc:
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not isinstance(exc, ChecksumMismatch | OSError) and service.kept_undecodable(
                blob_pk
            ):
                error = None  # intact as received, and flagged so: `compacs problems` lists it
            else:
                log.error("FIXITY FAILURE: blob %s on tier %s: %s", path, tier, error)
                metrics.FIXITY_FAILURES.inc()
                report.failed.append(f"{tier}/{path}: {error}")
        service.record_fixity(blob_pk, error)
        report.checked += 1
        if share < 1:
            time.sleep((time.monotonic() - begun) * (1 - share) / share)
    if report.checked:
        service.audit(
            "fixity_run", detail=f"{report.checked} blob(s) checked, {len(report.failed)} failed"
        )
    return report
