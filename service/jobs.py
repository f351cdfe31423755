"""Compression jobs: each claimed in the index, run in a worker process, retried, parked.

A received object is acknowledged as received (ingest.py); its compression runs here
afterwards, in worker processes (pyjpegls holds the GIL, so threads would cap at one core).
The process that runs a job holds a *claim* on the instance row (owner and lease, renewed
while it lives), so that several `compacs serve` processes on one index and archive root
never compress, or undo, the same row:

- each attempt writes its result to a fresh path; the result is recorded only if the claim
  still holds at the version it was taken (compare-and-swap), otherwise the attempt's file
  is deleted (nobody points at it) and nothing else is touched;
- a job that fails counts an attempt and its reason, is retried, and after `[ingest]
  max_attempts` is parked: kept as received, listed by stats and verify;
- a worker process that dies (a codec crash) takes its pool with it: the pool is made anew
  and the jobs it held are counted and retried;
- the blob a job replaces is released in the index, and deleted by the sweep a grace period
  later (storage/sweep.py), never while a C-GET may still be sending it.

The executor is injectable (tests run jobs in-process, deterministically); by default it is
a pool of spawned processes.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread

from compacs.service import rules as rules_mod
from compacs.service.compress import NOT_A_CODEC_FAILURE, Derived, compress
from compacs.service.config import NodeConfig
from compacs.service.storage.archive import Archive, new_token
from compacs.service.storage.index import Claim, Index, NewBlob, lease
from compacs.service.storage.schema import STATE_PARKED

log = logging.getLogger("compacs.jobs")

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Job:
    claim: Claim
    stored: str  # where this attempt writes the compressed object: a fresh path each time


@dataclass(frozen=True)
class JobResult:
    job: Job
    codec: str
    transfer_syntax: str
    received_size: int
    size: int
    checksum: str
    notes: tuple[str, ...]
    fallbacks: int
    source_error: str | None  # the pixel data as received does not decode
    derived: Derived | None  # a bounded-error result: a new instance


class JobError(Exception):
    """A job's failure as text: what a worker raises may not survive pickling (pyo3 panics)."""


# --- worker process side -------------------------------------------------------------
_worker: dict = {}


def worker_init(archive_root: str, rules: list[rules_mod.Rule]) -> None:
    """Set up a worker process (or, with an injected executor, this one)."""
    from compacs.service.cli import quiet_decoder_tracebacks

    if multiprocessing.parent_process() is not None:
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        quiet_decoder_tracebacks()
        try:  # one worker per core: its ONNX Runtime sessions take one thread each
            from compacs.models.runtime import set_default_threads
        except ImportError:  # the learned codec's runtime is missing: it is unavailable
            pass
        else:
            set_default_threads(1)
    _worker["archive"] = Archive(Path(archive_root))
    _worker["rules"] = rules


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
    try:
        return _run_job(job)
    except OSError:
        raise  # picklable, and the node tells a full disk from other I/O errors
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        raise JobError(f"{type(exc).__name__}: {exc}") from None


def _run_job(job: Job) -> JobResult:
    archive: Archive = _worker["archive"]
    claim = job.claim
    raw = archive.read(claim.blob_path, claim.checksum)
    ds = dcmread(BytesIO(raw))
    rule = rules_mod.select(
        _worker["rules"], rules_mod.object_attributes(ds, claim.calling_ae or "")
    )
    outcome = compress(raw, ds, rule.codecs if rule else ())
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
    )


# --- node side --------------------------------------------------------------------------
def process_pool(config: NodeConfig, archive: Archive) -> Callable[[], Executor]:
    """The default executor: spawned worker processes (never fork a threaded server), all
    started at once: each spends about a second importing its libraries, which would
    otherwise land on the first images received (and in ingest benchmarks)."""

    def make() -> Executor:
        pool = ProcessPoolExecutor(
            max_workers=config.effective_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker_init,
            initargs=(str(archive.root), config.rules),
        )
        for warm in [pool.submit(_warm_up) for _ in range(config.effective_workers)]:
            warm.result()
        return pool

    return make


class Jobs:
    """The compression jobs of one node process, under its owner name in the index."""

    def __init__(
        self,
        config: NodeConfig,
        archive: Archive,
        index: Index,
        owner: str,
        executor_factory: Callable[[], Executor] | None = None,
    ) -> None:
        self.config = config
        self.archive = archive
        self.index = index
        self.owner = owner
        if executor_factory is None:
            executor_factory = process_pool(config, archive)
        else:  # an in-process executor shares this process' globals
            worker_init(str(archive.root), config.rules)
        self._make_executor = executor_factory
        # in flight: the job and the executor running it
        self._jobs: dict[Future, tuple[Job, Executor]] = {}
        self._in_flight: set[tuple[int, int]] = set()  # (instance id, version) of each claim
        self._retries: set[threading.Timer] = set()
        self._closing = False
        self._lock = threading.Lock()
        self.idle = threading.Condition(self._lock)
        self.executor = executor_factory()

    def lease_until(self):  # noqa: ANN201 - a datetime
        return lease(self.config.ingest.lease_seconds)

    def submit(self, claim: Claim) -> None:
        """Queue compression of a claimed instance. Never raises: the row stays pending
        whatever happens here (another attempt, or another process after the lease), and a
        pool that broke is made anew."""
        with self._lock:
            if (claim.instance_id, claim.version) in self._in_flight or self._closing:
                return
            self._in_flight.add((claim.instance_id, claim.version))
        job = Job(claim, self._stored_path(claim))
        for _ in range(2):
            executor = self.executor
            try:
                future = executor.submit(run_job, job)
            except BrokenProcessPool:
                self._renew_executor(executor)
                continue
            except RuntimeError as exc:  # shutting down
                log.info("compression of SOP %s not queued (%s)", claim.sop_instance_uid, exc)
                break
            with self._lock:
                self._jobs[future] = (job, executor)
            future.add_done_callback(self._finish)
            return
        with self._lock:
            self._in_flight.discard((claim.instance_id, claim.version))
            self.idle.notify_all()

    def _stored_path(self, claim: Claim) -> str:
        return self.archive.stored_path(
            claim.study_instance_uid, claim.series_instance_uid, claim.sop_instance_uid, new_token()
        )

    def _renew_executor(self, broken: Executor) -> None:
        """Replace a pool whose worker died; once, whoever sees it first."""
        with self._lock:
            if self.executor is not broken or self._closing:
                return
            log.error("a compression worker died: starting a new worker pool")
            try:
                self.executor = self._make_executor()
            except Exception:
                log.exception("a new compression worker pool could not be started")
        broken.shutdown(wait=False, cancel_futures=True)

    def _retry_later(self, claim: Claim) -> None:
        def retry() -> None:
            with self._lock:
                self._retries.discard(timer)
            if not self._closing:
                self.submit(claim)

        timer = threading.Timer(self.config.ingest.retry_seconds, retry)
        timer.daemon = True
        with self._lock:
            self._retries.add(timer)
        timer.start()

    def _finish(self, future: Future) -> None:
        with self._lock:
            job, executor = self._jobs[future]
        claim = job.claim
        try:
            if future.cancelled():
                return  # shutting down: the claim is released, the row stays pending
            exc = future.exception()
            if exc is None:
                self._record(future.result())
            elif isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
                # The received copy is safe: try again when there is room, without counting
                # it against the object.
                log.error(
                    "compression of SOP %s: disk full (%s); retrying in %g s",
                    claim.sop_instance_uid,
                    exc,
                    self.config.ingest.retry_seconds,
                )
                if self.index.still_claimed(claim, self.owner):
                    self._retry_later(claim)
            else:
                if isinstance(exc, BrokenProcessPool):
                    self._renew_executor(executor)
                    exc = JobError(f"the worker process died while the job ran or waited ({exc})")
                self._failed(claim, exc)
        except Exception:
            log.exception("recording a compression result failed; the object stays pending")
        finally:
            with self._lock:
                self._jobs.pop(future, None)
                self._in_flight.discard((claim.instance_id, claim.version))
                self.idle.notify_all()

    def _failed(self, claim: Claim, exc: BaseException) -> None:
        """Count a failed attempt; retry later, or park the object after max_attempts."""
        reason = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
        limit = self.config.ingest.max_attempts
        state = self.index.record_failure(claim, self.owner, reason, limit)
        sop = claim.sop_instance_uid
        if state is None:  # replaced meanwhile, or the claim was lost: not ours any more
            log.info("compression of SOP %s dropped: the object changed or moved on", sop)
        elif state == STATE_PARKED:
            log.error(
                "compression of SOP %s failed %d times, parked (kept as received): %s",
                sop,
                limit,
                reason,
            )
            self.index.audit("parked", sop_uid=sop, calling_ae=claim.calling_ae, detail=reason)
        else:
            log.error(
                "compression of SOP %s failed (%s); retrying in %g s",
                sop,
                reason,
                self.config.ingest.retry_seconds,
            )
            self._retry_later(claim)

    def _record(self, result: JobResult) -> None:
        job = result.job
        claim = job.claim
        stored = self.index.mark_stored(
            claim,
            self.owner,
            NewBlob(job.stored, result.size, result.checksum),
            stored_transfer_syntax=result.transfer_syntax,
            codec=result.codec,
            **({"defects": result.source_error} if result.source_error else {}),
            **(_derived_fields(result.derived) if result.derived else {}),
        )
        if not stored:  # replaced, or another process took over: our file belongs to no row
            self.archive.delete(job.stored)
            log.info(
                "compression of SOP %s discarded: the object changed meanwhile",
                claim.sop_instance_uid,
            )
            return
        if result.source_error:
            flagged(
                self.index,
                claim.sop_instance_uid,
                claim.calling_ae or "",
                result.source_error,
                True,
            )
        ratio = result.received_size / result.size if result.size else 0.0
        log.info(
            "stored SOP %s from %s: codec %s, %d -> %d bytes, ratio %.2f%s",
            claim.sop_instance_uid,
            claim.calling_ae,
            result.codec,
            result.received_size,
            result.size,
            ratio,
            f" ({'; '.join(result.notes)})" if result.notes else "",
        )
        if result.derived:
            derived = result.derived
            log.warning(
                "SOP %s stored LOSSILY as derived SOP %s (codec %s, max |error| %d, bound %d: "
                "a rule allows it)",
                derived.source_sop_instance_uid,
                derived.sop_instance_uid,
                result.codec,
                derived.max_error,
                derived.bound,
            )
            self.index.audit(
                "lossy_derived",
                sop_uid=derived.sop_instance_uid,
                calling_ae=claim.calling_ae,
                detail=f"from {derived.source_sop_instance_uid}, {result.codec}, "
                f"max |error| {derived.max_error} <= {derived.bound}",
            )
        if result.fallbacks:
            self.index.audit(
                "codec_fallback",
                sop_uid=claim.sop_instance_uid,
                calling_ae=claim.calling_ae,
                detail="; ".join(result.notes),
            )

    def claim_abandoned(self, *, own_too: bool = False) -> int:
        """Claim and queue pending instances nobody holds (a process died; or, `own_too`,
        this owner's previous life): the recovery, at start and every so often."""
        claims = self.index.claim_pending(self.owner, self.lease_until(), own_too=own_too)
        for claim in claims:
            self.submit(claim)
        return len(claims)

    def renew(self) -> None:
        self.index.renew_claims(self.owner, self.lease_until())

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no compression job is in flight (tests, benchmarks, shutdown)."""
        with self._lock:
            return self.idle.wait_for(lambda: not self._jobs and not self._retries, timeout)

    def shutdown(self) -> None:
        """Let running jobs finish; queued ones stay pending, released for any process."""
        with self._lock:
            self._closing = True
            for timer in self._retries:
                timer.cancel()
            self._retries.clear()
        self.executor.shutdown(wait=True, cancel_futures=True)
        released = self.index.release_claims(self.owner)
        if released:
            log.info(
                "%d object(s) still pending compression; they resume at the next start", released
            )


def _derived_fields(derived: Derived) -> dict:
    return {
        "sop_instance_uid": derived.sop_instance_uid,
        "derived_from": derived.source_sop_instance_uid,
        "lossy_bound": derived.bound,
        "max_error": derived.max_error,
    }


def flagged(index: Index, sop_uid: str, calling_ae: str, defects: str, as_received: bool) -> None:
    """Tell the administrator of an object kept although non-conformant: log and audit."""
    log.warning(
        "non-conformant object from %s kept%s: SOP %s: %s",
        calling_ae,
        " as received, not compressed" if as_received else "",
        sop_uid,
        defects,
    )
    index.audit("nonconformant", sop_uid=sop_uid, calling_ae=calling_ae, detail=defects)
