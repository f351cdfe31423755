"""Compression jobs, the worker process side: what a job is, and how one runs.

A job (jobs.py claims and queues it) is compressed here, in a worker process of its own
(pyjpegls holds the GIL, so threads would cap at one core): the received object is read
from the archive, the rule for it chosen, its codecs run (compress.py, or compress_file.py
for a big object read frame by frame), and the result written durably to the attempt's
fresh path. Nothing here touches the index: the node records a result only if its claim
still holds (jobs.py), and deletes the attempt's file otherwise.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from compacs.service import handoff, logs, metrics
from compacs.service import rules as rules_mod
from compacs.service.compress import (
    NOT_A_CODEC_FAILURE,
    Derived,
    compress,
    source_frames,
)
from compacs.service.compress_file import compress_file
from compacs.service.config import NodeConfig
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Claim
from compacs.service.wire import STREAM_ABOVE, read_head


@dataclass(frozen=True)
class Job:
    claim: Claim
    stored: str  # where this attempt writes the compressed object: a fresh path each time


@dataclass(frozen=True)
class Arrival:
    """An object compressed before its acknowledgement (ingest.py): its bytes as received
    travel to the worker, which writes only the compressed form, at `stored`."""

    raw: bytes  # empty when they come through `handoff` instead
    calling_ae: str
    stored: str
    handoff: str | None = None  # a shared-memory file holding them (handoff.py)


@dataclass(frozen=True)
class JobResult:
    job: Job | Arrival
    codec: str
    transfer_syntax: str
    received_size: int
    size: int
    checksum: str
    notes: tuple[str, ...]
    fallbacks: int
    source_error: str | None  # the pixel data as received does not decode
    derived: Derived | None  # a bounded-error result: a new instance
    modality: str = "unknown"  # metrics.modality_label: counted by the node (metrics.py)


class JobError(Exception):
    """A job's failure as text: what a worker raises may not survive pickling (pyo3 panics)."""


_worker: dict = {}


def worker_init(archive_root: str, rules: list[rules_mod.Rule], log_format: str = "text") -> None:
    """Set up a worker process (or, with an injected executor, this one)."""
    from compacs.service.logs import quiet_decoder_tracebacks

    if multiprocessing.parent_process() is not None:
        _exit_with_parent()
        logs.configure_worker(log_format)
        quiet_decoder_tracebacks()
        try:  # one worker per core: its ONNX Runtime sessions take one thread each
            from compacs.models.runtime import set_default_threads
        except ImportError:  # the learned codec's runtime is missing: it is unavailable
            pass
        else:
            set_default_threads(1)
    _worker["archive"] = Archive(Path(archive_root))
    _worker["rules"] = rules


def _exit_with_parent() -> None:
    """End this worker when the node process that started it ends, however it ends: a node
    killed with SIGKILL (or by the out-of-memory killer) cannot shut its pool down, and its
    workers would otherwise live on, holding memory and the archive's files, until someone
    kills them by hand. A thread waits on the parent's sentinel (no polling)."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="compacs-parent-watch", daemon=True).start()


def _warm_up() -> None:
    """Make the pool start a worker and load the libraries of the codecs the rules name (the
    first image would), and only those: a codec a rule does not name may lack its optional
    dependency (`pip install compacs` without onnxruntime), and an unavailable one is skipped
    as compress() skips it."""
    import time

    from compacs.codecs import registry

    for name in rules_mod.codec_names(_worker["rules"]):
        registry.get(name).is_available()  # imports its dependencies, once
    time.sleep(0.2)  # busy long enough that the pool starts another worker for the next one


def run_job(job: Job) -> JobResult:
    """Compress one received object and write the result durably (in a worker process)."""
    return _reporting(_run_job, job)


def run_arrival(arrival: Arrival) -> JobResult:
    """Compress an object not yet acknowledged, from its bytes, and write the result durably
    (in a worker process)."""
    return _reporting(_compress_and_write, arrival, None)


def _reporting(work: Callable[..., JobResult], *args: object) -> JobResult:
    """`work`'s result; its failure as a JobError, or an OSError (picklable, and the node
    tells a full disk from other I/O errors)."""
    try:
        return work(*args)
    except OSError:
        raise
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        raise JobError(f"{type(exc).__name__}: {exc}") from None


def _run_job(job: Job) -> JobResult:
    archive: Archive = _worker["archive"]
    claim = job.claim
    if archive.abspath(claim.blob_path).stat().st_size > STREAM_ABOVE:
        result = _run_big_job(job, archive)
        if result is not None:
            return result
    return _compress_and_write(job, archive.read(claim.blob_path, claim.checksum))


def _compress_and_write(job: Job | Arrival, raw: bytes | None) -> JobResult:
    archive: Archive = _worker["archive"]
    calling_ae = job.calling_ae if isinstance(job, Arrival) else job.claim.calling_ae
    if raw is None:  # an arrival's bytes
        raw = handoff.read(job.handoff) if job.handoff else job.raw
    ds = dcmread(BytesIO(raw))
    rule = rules_mod.select(_worker["rules"], rules_mod.object_attributes(ds, calling_ae or ""))
    outcome = compress(raw, ds, rule.codecs if rule else ())
    if outcome.codec == "passthrough" and outcome.source_error is None:
        outcome.source_error = undecodable_arrival(ds)
    digest = archive.write(job.stored, outcome.data)
    return JobResult(
        job,
        outcome.codec,
        outcome.transfer_syntax,
        len(raw),
        len(outcome.data),
        digest,
        tuple(outcome.notes),
        outcome.fallbacks,
        outcome.source_error,
        outcome.derived,
        metrics.modality_label(ds.get("Modality")),
    )


def undecodable_arrival(ds: Dataset) -> str | None:
    """Why a compressed arrival kept as received does not decode (None when it does, or when
    it is not compressed). The runner decodes an arrival only to re-encode it, so one that
    arrived in the rule's syntax already, or under a rule that keeps it, would otherwise be
    found damaged only by `compacs verify`, long after the sender could send it again."""
    if "PixelData" not in ds or not UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed:
        return None
    try:
        source_frames(ds)
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"pixel data does not decode: {reason}".splitlines()[0]
    return None


def _run_big_job(job: Job, archive: Archive) -> JobResult | None:
    """A big object compressed from its file, frame by frame (compress_file), so that a
    worker never holds it whole; None: one that compress_file leaves to the in-memory path."""
    claim = job.claim
    size = archive.abspath(claim.blob_path).stat().st_size
    with archive.open_checked(claim.blob_path, 0, size, claim.checksum) as source:
        ds, _element, _error = read_head(source, size)
        rule = rules_mod.select(
            _worker["rules"], rules_mod.object_attributes(ds, claim.calling_ae or "")
        )
        outcome = compress_file(
            source,
            size,
            rule.codecs if rule else (),
            lambda produce: archive.write_stream(job.stored, produce),
            lambda: archive.delete(job.stored),
        )
    if outcome is None:
        return None
    if outcome.written is None:  # kept as received: the same bytes under the stored path
        archive.adopt(job.stored, archive.abspath(claim.blob_path))
    stored_size, digest = outcome.written or (size, claim.checksum)
    return JobResult(
        job,
        outcome.codec,
        outcome.transfer_syntax,
        size,
        stored_size,
        digest,
        tuple(outcome.notes),
        outcome.fallbacks,
        outcome.source_error,
        None,
        metrics.modality_label(ds.get("Modality")),
    )


def process_pool(
    config: NodeConfig, archive: Archive, workers: int | None = None
) -> Callable[[], Executor]:
    """The default executor: spawned worker processes (never fork a threaded server), all
    started at once: each spends about a second importing its libraries, which would
    otherwise land on the first images received (and in ingest benchmarks). `workers`: the
    config's count by default; 1 for the pool that runs suspects alone."""
    count = workers or config.effective_workers

    def make() -> Executor:
        pool = ProcessPoolExecutor(
            max_workers=count,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker_init,
            initargs=(str(archive.root), config.rules, config.logging.format),
        )
        for warm in [pool.submit(_warm_up) for _ in range(count)]:
            warm.result()
        return pool

    return make
