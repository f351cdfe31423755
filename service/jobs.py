"""Compression jobs: each claimed in the index, run in a worker process, retried, parked.

A received object is acknowledged as received (ingest.py); its compression is queued here
afterwards and runs in worker processes (compress_worker.py: the job itself and the pool).
The process that runs a job holds a *claim* on the instance row (owner and lease, renewed
while it lives), so that several `compacs serve` processes on one index and archive root
never compress, or undo, the same row:

- each attempt writes its result to a fresh path; the result is recorded only if the claim
  still holds at the version it was taken (compare-and-swap), otherwise the attempt's file
  is deleted (nobody points at it) and nothing else is touched;
- a job that fails counts an attempt and its reason, is retried, and after `[ingest]
  max_attempts` is parked: kept as received, listed by stats and verify;
- a worker process that dies (a codec crash: a segfault, os._exit, the kernel's OOM killer)
  takes its pool with it, and every job the pool held fails alike, whether it ran or merely
  waited. None of them is charged: the pool is made anew and those jobs become *suspects*,
  run one at a time in a pool of one worker of their own until the one that kills its worker
  is found. Only that culprit counts an attempt (and is parked after max_attempts, its later
  attempts run alone too); the other suspects go back to the shared pool. A compressed
  arrival whose pixels do not decode is no failure at all: it is kept as received and
  flagged ("undecodable pixel data", with the decoder's reason) when its job first meets it;
- the blob a job replaces is released in the index, and deleted by the sweep a grace period
  later (ArchiveService.sweep, archive_service.py), never while a C-GET may still be
  sending it.

The executor is injectable (tests run jobs in-process, deterministically); by default it is
a pool of spawned processes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool

from compacs.service import handoff
from compacs.service.compress import Derived
from compacs.service.compress_worker import (
    Arrival,
    Job,
    JobError,
    JobResult,
    process_pool,
    run_arrival,
    run_job,
    undecodable_arrival,
    worker_init,
)
from compacs.service.config import NodeConfig
from compacs.service.storage.archive import DISK_FULL_ERRNOS, Archive, disk_full, new_token
from compacs.service.storage.index import Claim, Index, NewBlob, lease
from compacs.service.storage.schema import STATE_PARKED
from compacs.service.stored_report import flagged, report_stored

# The worker side's names, importable from here as before the split (tests use
# jobs.process_pool and jobs.worker_init).
__all__ = [
    "Arrival",
    "Job",
    "JobError",
    "JobResult",
    "Jobs",
    "flagged",
    "process_pool",
    "run_job",
    "undecodable_arrival",
    "worker_init",
]

log = logging.getLogger("compacs.jobs")

# The longest a sender waits for its object's compression before the ack (compress_now):
# past it the object is stored as received and acknowledged; a 512² CT takes ~15 ms.
COMPRESS_NOW_SECONDS = 20.0
BACKLOG_PER_WORKER = 4  # queued jobs a worker, beyond which arrivals are acknowledged first


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
        # Arrivals reach spawned workers through shared memory (handoff.py); an in-process
        # executor (tests) shares this process' memory already.
        self._handoff = executor_factory is None
        if executor_factory is None:
            handoff.sweep_dead()
            executor_factory = process_pool(config, archive)
            isolation_factory = process_pool(config, archive, workers=1)
        else:  # an in-process executor shares this process' globals
            worker_init(str(archive.root), config.rules)
            isolation_factory = executor_factory
        self._make_executor = executor_factory
        self._make_isolation = isolation_factory
        # in flight: the job, the executor running it, and whether it runs alone (a suspect)
        self._jobs: dict[Future, tuple[Job, Executor, bool]] = {}
        self._in_flight: set[tuple[int, int]] = set()  # (instance id, version) of each claim
        self._retries: set[threading.Timer] = set()
        # Jobs a broken pool held, waiting to run alone; whether one runs alone now (or its
        # pool is being started); that pool, made when first needed; the instances whose job
        # killed its worker while it ran alone (their next attempts run alone too).
        self._suspects: deque[Claim] = deque()
        self._isolating = False
        self._isolation: Executor | None = None
        self._crashed: set[int] = set()
        self._closing = False
        self._inline = 0  # arrivals being compressed before their ack (compress_now)
        self._workers = max(1, config.effective_workers)
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
        self._dispatch(claim)

    def compress_now(self, raw: bytes, calling_ae: str, stored: str) -> JobResult | None:
        """Compress an arrival in a worker while its sender waits for the ack, unless a
        backlog of queued jobs waits for the workers (say the pending objects found at start:
        the ack would wait behind all of them); its result written at `stored`, not yet
        indexed. None when there is a backlog or the attempt failed in any way: the
        caller then stores the object as received and queues it, as for any arrival, and the
        attempt's file is gone. A worker that dies here breaks the pool as a job's would.

        The backlog allowed (BACKLOG_PER_WORKER jobs a worker) is not zero on purpose: the
        first objects of senders that start together are acknowledged first, and would, if
        any queued job sent the next ones that way too, keep a queue that never drains (an
        acknowledged-first sender sends faster than the workers compress)."""
        with self._lock:
            if self._closing or len(self._jobs) >= BACKLOG_PER_WORKER * self._workers:
                return None
            self._inline += 1
        executor = self.executor
        future: Future | None = None
        shared = handoff.write(raw) if self._handoff else None
        arrival = Arrival(b"" if shared else raw, calling_ae, stored, shared)
        try:
            future = executor.submit(run_arrival, arrival)
            return future.result(timeout=COMPRESS_NOW_SECONDS)
        except Exception as exc:
            if isinstance(exc, BrokenProcessPool):
                self._renew_executor(executor)
            if future is not None and not future.done():  # too slow: its files when it ends
                future.add_done_callback(lambda _: self._discard(arrival))
                shared = None
            else:
                self.archive.delete(stored)
            log.warning(
                "compression before the ack failed (%s: %s); the object is stored as received "
                "and compressed afterwards",
                type(exc).__name__,
                exc,
            )
            return None
        finally:
            handoff.remove(shared)
            with self._lock:
                self._inline -= 1
                self.idle.notify_all()

    def _discard(self, arrival: Arrival) -> None:
        self.archive.delete(arrival.stored)
        handoff.remove(arrival.handoff)

    def _dispatch(self, claim: Claim) -> None:
        """Send an in-flight claim to the shared pool; one whose job killed its worker before
        waits for the pool of one instead, so that it cannot take others with it again."""
        if claim.instance_id in self._crashed:
            with self._lock:
                self._suspects.append(claim)
            self._isolate_next()
            return
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
                self._jobs[future] = (job, executor, False)
            future.add_done_callback(self._finish)
            return
        with self._lock:
            self._in_flight.discard((claim.instance_id, claim.version))
            self.idle.notify_all()

    def _isolate_next(self) -> None:
        """Run the next suspect alone, unless one runs alone already: a worker that dies
        then names its job."""
        with self._lock:
            if self._isolating or self._closing:
                return
            if not self._suspects:
                idle, self._isolation = self._isolation, None
                if idle is not None and self._make_isolation is not self._make_executor:
                    idle.shutdown(wait=False)  # no lone worker lingers; the next is fresh
                return
            self._isolating = True
            claim = self._suspects.popleft()
        job = Job(claim, self._stored_path(claim))
        try:
            if self._isolation is None:
                self._isolation = self._make_isolation()
            pool = self._isolation
            future = pool.submit(run_job, job)
        except Exception as exc:  # a pool that cannot start, or shutting down: try later
            with self._lock:
                self._isolating = False
                self._suspects.appendleft(claim)
            self._isolation = None
            if not self._closing:
                log.error("a compression worker for one job could not be started (%s)", exc)
                self._later(self._isolate_next)
            return
        with self._lock:
            self._jobs[future] = (job, pool, True)
        future.add_done_callback(self._finish)
        if self._closing:  # shutdown() may have looked for this pool before it existed
            pool.shutdown(wait=False, cancel_futures=True)

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

    def _later(self, action: Callable[[], None]) -> None:
        """Run `action` after [ingest] retry_seconds (wait_idle waits for it)."""

        def fire() -> None:
            with self._lock:
                self._retries.discard(timer)
            if not self._closing:
                action()

        timer = threading.Timer(self.config.ingest.retry_seconds, fire)
        timer.daemon = True
        with self._lock:
            self._retries.add(timer)
        timer.start()

    def _retry_later(self, claim: Claim) -> None:
        self._later(lambda: self.submit(claim))

    def _finish(self, future: Future) -> None:
        with self._lock:
            job, executor, alone = self._jobs[future]
        claim = job.claim
        key = (claim.instance_id, claim.version)
        suspect = False
        release = True  # still in flight at the end: drop it from _in_flight then
        try:
            if future.cancelled():
                return  # shutting down: the claim is released, the row stays pending
            exc = future.exception()
            if isinstance(exc, BrokenProcessPool):
                self.archive.delete(job.stored)  # an attempt cut off: nobody points at it
                if not alone:  # it ran beside the culprit, or merely waited: not charged
                    self._renew_executor(executor)
                    suspect = not self._closing
                    release = not suspect
                    return
            with self._lock:  # before a retry may submit the claim again
                self._in_flight.discard(key)
                release = False
            if isinstance(exc, BrokenProcessPool):
                self._culprit(claim, executor, exc)
            elif exc is None:
                self._crashed.discard(claim.instance_id)
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
                self._failed(claim, exc)
        except Exception as exc:
            # The claim is still this process' and renewed while it lives, so no other
            # process takes the object over: unless it is tried again here it would stay
            # pending for good (found by the disk-full fault test).
            retry = self.config.ingest.retry_seconds
            if disk_full(exc):  # the operator's to fix, said in one line: no traceback
                log.error(
                    "recording a compression result failed, disk full (%s); the object "
                    "stays pending, retrying in %g s",
                    exc.__class__.__name__,
                    retry,
                )
                self._retry_later(claim)
                return
            log.exception("recording a compression result failed: charged as a failed attempt")
            try:  # retried, then parked after max_attempts, as a failing codec would be
                self._failed(claim, exc)
            except Exception:
                log.exception("charging it failed too; retrying in %g s", retry)
                self._retry_later(claim)
        finally:
            with self._lock:
                self._jobs.pop(future, None)
                if suspect:
                    self._suspects.append(claim)
                if release:
                    self._in_flight.discard(key)
                if alone:
                    self._isolating = False
                self.idle.notify_all()
            if suspect or alone:
                self._isolate_next()

    def _culprit(self, claim: Claim, pool: Executor, exc: BaseException) -> None:
        """A worker died running this job alone: it is the one to charge. The other suspects
        were not in that pool; they go back to the shared one."""
        if self._isolation is pool:
            self._isolation = None
        pool.shutdown(wait=False, cancel_futures=True)
        self._crashed.add(claim.instance_id)
        with self._lock:
            cleared = list(self._suspects)
            self._suspects.clear()
        log.error(
            "SOP %s kills the compression worker that runs it alone: charged one attempt%s",
            claim.sop_instance_uid,
            f"; {len(cleared)} other job(s) it held up go back to the worker pool"
            if cleared
            else "",
        )
        for other in cleared:
            self._dispatch(other)
        self._failed(
            claim,
            JobError(
                "the compression worker died running this object alone (a codec crash: a "
                f"segfault, os._exit or the out-of-memory killer; {exc})"
            ),
        )

    def _failed(self, claim: Claim, exc: BaseException) -> None:
        """Count a failed attempt; retry later, or park the object after max_attempts."""
        reason = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
        limit = self.config.ingest.max_attempts
        state = self.index.record_failure(claim, self.owner, reason, limit)
        sop = claim.sop_instance_uid
        if state is None:  # replaced meanwhile, or the claim was lost: not ours any more
            log.info("compression of SOP %s dropped: the object changed or moved on", sop)
        elif state == STATE_PARKED:
            self._crashed.discard(claim.instance_id)
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
        try:
            stored = self.index.mark_stored(
                claim,
                self.owner,
                NewBlob(job.stored, result.size, result.checksum),
                stored_transfer_syntax=result.transfer_syntax,
                codec=result.codec,
                flag=result.source_error,
                **(_derived_fields(result.derived) if result.derived else {}),
            )
        except Exception as exc:
            # A full disk refuses the write before it commits: the new file is no row's, and
            # the retry writes another. Any other failure may have come after a commit (a
            # connection lost then): the file stays, for recovery to judge.
            if disk_full(exc):
                self.archive.delete(job.stored)
            raise
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
        report_stored(self.index, result, claim.sop_instance_uid, claim.calling_ae or "")

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
            return self.idle.wait_for(
                lambda: (
                    not (
                        self._jobs
                        or self._retries
                        or self._suspects
                        or self._isolating
                        or self._inline
                    )
                ),
                timeout,
            )

    def shutdown(self) -> None:
        """Let running jobs finish; queued ones stay pending, released for any process."""
        with self._lock:
            self._closing = True
            for timer in self._retries:
                timer.cancel()
            self._retries.clear()
            self._suspects.clear()  # their claims are released below, like queued jobs
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._isolation is not None:
            self._isolation.shutdown(wait=True, cancel_futures=True)
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
