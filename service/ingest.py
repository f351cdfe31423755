"""From a received object to an acknowledged, archived, indexed and compressed one.

The acknowledgement waits only for what invariant 1 needs: the object as received is
durably on disk and its index row is committed (state "pending"). Compression, bit-exact
verification and the swap to the compressed blob happen afterwards in worker processes
(pyjpegls holds the GIL, so threads would cap at one core); DESIGN.md measured this split
at about twice the rate of compressing before the ack. A crash at any point leaves either
a pending row with its received blob (compressed again at the next start) or a stored
row with its compressed blob; `recover` cleans what a crash left half-done.

Once the row is committed the answer is Success, whatever happens to the compression job:
a job that fails counts an attempt and the reason in the index and is retried, and after
`[ingest] max_attempts` it is parked (kept as received, listed by stats and verify) rather
than retried for ever; a worker process that dies (a codec crash) takes its pool with it,
so the pool is made anew and the jobs it held are counted and resubmitted.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from compacs.service import rules as rules_mod
from compacs.service.compress import NOT_A_CODEC_FAILURE, compress
from compacs.service.config import NodeConfig
from compacs.service.storage.archive import Archive, checksum
from compacs.service.storage.index import STATE_PARKED, STATE_STORED, Index
from compacs.service.validate import (
    IDENTITY_UIDS,
    PIXELS,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    BadInput,
    Defect,
    inspect,
    uid_value,
)

log = logging.getLogger("compacs.ingest")

STATUS_SUCCESS = 0x0000
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Job:
    sop_uid: str
    incoming: str  # blob path of the received object
    stored: str  # where the compressed object goes
    calling_ae: str


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


class JobError(Exception):
    """A job's failure as text: what a worker raises may not survive pickling (pyo3 panics)."""


# --- worker process side -------------------------------------------------------------
_worker: dict = {}


def _worker_init(archive_root: str, rules: list[rules_mod.Rule]) -> None:
    from compacs.service.cli import quiet_decoder_tracebacks

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_decoder_tracebacks()
    _worker["archive"] = Archive(Path(archive_root))
    _worker["rules"] = rules


def _warm_up() -> None:
    """Make the pool start a worker and load the codec libraries the first image would."""
    import importlib
    import time

    from compacs.codecs import registry

    for codec in registry.all_codecs():
        for module in codec.dependencies:
            importlib.import_module(module)
    time.sleep(0.2)  # busy long enough that the pool starts another worker for the next one


def run_job(job: Job, expected_checksum: str) -> JobResult:
    """Compress one received object and write the result durably (in a worker process)."""
    try:
        return _run_job(job, expected_checksum)
    except OSError:
        raise  # picklable, and the node tells a full disk from other I/O errors
    except BaseException as exc:
        if isinstance(exc, NOT_A_CODEC_FAILURE):
            raise
        raise JobError(f"{type(exc).__name__}: {exc}") from None


def _run_job(job: Job, expected_checksum: str) -> JobResult:
    archive: Archive = _worker["archive"]
    raw = archive.read(job.incoming, expected_checksum)
    ds = dcmread(BytesIO(raw))
    rule = rules_mod.select(_worker["rules"], rules_mod.object_attributes(ds, job.calling_ae))
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
    )


def parse(raw: bytes) -> tuple[Dataset, list[Defect]]:
    """The received data set, and what is wrong with its encoding.

    pydicom returns an empty data set for some damaged files (encapsulated pixel data cut
    off before its sequence delimiter), although everything before the pixel data is
    fine: such an object is identifiable and is kept, flagged. A data set whose VR encoding
    is not the one its transfer syntax says is read as found, and flagged.
    """
    try:
        ds = dcmread(BytesIO(raw))
    except Exception:
        ds = None
    if ds is None or not all(uid_value(ds, k) for k in IDENTITY_UIDS):
        try:
            head = dcmread(BytesIO(raw), stop_before_pixels=True)
        except Exception as exc:
            raise BadInput(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be read: {exc}") from exc
        if ds is None or len(head) > len(ds):
            why = "the data set cannot be read past its pixel data (truncated or malformed)"
            return head, [Defect(PIXELS, why), *_encoding_defects(raw, head)]
    return ds, _encoding_defects(raw, ds)


def _encoding_defects(raw: bytes, ds: Dataset) -> list[Defect]:
    """A data set in implicit VR under an explicit VR syntax, or the other way round: pydicom
    reads it as found (and warns), but such bytes trip up other readers and writers."""
    from compacs.service.wire import dataset_start

    said = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    if not said.is_transfer_syntax or said.is_deflated:
        return []
    try:
        start = dataset_start(raw)
    except ValueError:
        return []
    vr = bytes(raw[start + 4 : start + 6])
    found_explicit = len(vr) == 2 and vr.isalpha() and vr.isupper()
    if found_explicit == said.is_implicit_VR:
        found = "explicit" if found_explicit else "implicit"
        return [Defect("encoding", f"the data set is in {found} VR, unlike {said.name}")]
    return []


def dataset_hash(raw: bytes) -> str:
    """A hash of the data set without its file meta group (which names the sender and the
    receiving node), to tell a harmless re-send from a changed one."""
    from compacs.service.wire import dataset_start

    return checksum(memoryview(raw)[dataset_start(raw) :])


# --- node side --------------------------------------------------------------------------
class Ingest:
    """Receives objects for the SCP and drives the compression workers."""

    def __init__(self, config: NodeConfig, archive: Archive, index: Index) -> None:
        self.config = config
        self.archive = archive
        self.index = index
        # in flight: the job, the checksum its blob must have, and the pool running it
        self._jobs: dict[Future, tuple[Job, str, ProcessPoolExecutor]] = {}
        self._retries: set[threading.Timer] = set()
        self._closing = False
        self._lock = threading.Lock()
        self.idle = threading.Condition(self._lock)
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.config.effective_workers,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded server
            initializer=_worker_init,
            initargs=(str(self.archive.root), self.config.rules),
        )
        # Start every worker now: each spends about a second importing its libraries, which
        # would otherwise land on the first images received (and in ingest benchmarks).
        for warm in [pool.submit(_warm_up) for _ in range(self.config.effective_workers)]:
            warm.result()
        return pool

    # called by the C-STORE handler, one thread per association
    def receive(self, raw: bytes, calling_ae: str, sop_class: str, sop_inst: str) -> int:
        """Archive one object and return the C-STORE status to answer."""
        try:
            ds, defects = parse(raw)
            defects += inspect(ds, sop_class, sop_inst)
            if defects and self.config.ingest.strict:
                raise BadInput(
                    STATUS_DATASET_MISMATCH,
                    "; ".join(d.text for d in defects) + " ([ingest] strict = true)",
                )
            received_hash = dataset_hash(raw)
            received_ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception as exc:  # pydicom may fail on malformed elements while we check
            bad = (
                exc
                if isinstance(exc, BadInput)
                else BadInput(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be read: {exc}")
            )
            log.warning(
                "refused from %s: SOP %s: %s (status 0x%04X)",
                calling_ae,
                str(sop_inst)[:64],
                bad.reason,
                bad.status,
            )
            return bad.status
        orphan = None  # a blob written but not (yet) in the index
        job = None
        try:
            existing = self.index.received_version(sop_inst)
            if existing is not None:
                same = (
                    existing.received_hash == received_hash
                    and existing.received_transfer_syntax == received_ts
                )
                if same:
                    log.info(
                        "duplicate from %s: SOP %s already stored, same data set",
                        calling_ae,
                        sop_inst,
                    )
                    return STATUS_SUCCESS
                if self.config.on_duplicate == "keep_first":
                    log.warning(
                        "re-sent from %s with different content: SOP %s; keeping the first "
                        "(on_duplicate = keep_first)",
                        calling_ae,
                        sop_inst,
                    )
                    self.index.audit(
                        "duplicate_kept_first", sop_uid=sop_inst, calling_ae=calling_ae
                    )
                    return STATUS_SUCCESS
            job = self._new_job(ds, sop_inst, calling_ae)
            # An object whose pixel data disagrees with its attributes is kept exactly as
            # received: decoding it would read something other than what was sent.
            keep_as_received = any(d.kind == PIXELS for d in defects)
            blob = job.stored if keep_as_received else job.incoming
            orphan = blob
            digest = self.archive.write(blob, raw)
            fields = dict(
                calling_ae=calling_ae,
                sop_class_uid=uid_value(ds, "SOPClassUID") or sop_class,
                received_transfer_syntax=received_ts,
                received_size=len(raw),
                received_hash=received_hash,
                stored_transfer_syntax=received_ts,
                stored_size=len(raw),
                blob_path=blob,
                checksum=digest,
                defects="; ".join(d.text for d in defects) or None,
            )
            if keep_as_received:
                fields.update(state=STATE_STORED, codec="passthrough")
            if existing is None:
                self.index.add_received(ds, **fields)
            else:
                self.index.replace_received(ds, **fields)
            orphan = None
            if existing is not None:
                self.archive.delete(existing.blob_path)
                self.index.audit("replaced", sop_uid=sop_inst, calling_ae=calling_ae)
                log.warning(
                    "re-sent from %s with different content: SOP %s replaced "
                    "(on_duplicate = replace)",
                    calling_ae,
                    sop_inst,
                )
            if defects:
                self._flagged(sop_inst, calling_ae, fields["defects"], keep_as_received)
        except Exception as exc:
            if orphan is not None:  # never acknowledged nor indexed: must not linger
                self.archive.delete(orphan)
            return self._failure_status(exc, sop_inst, calling_ae)
        if not keep_as_received:
            self.submit(job, digest)  # never raises: the object is safe whatever happens
        return STATUS_SUCCESS

    def _flagged(self, sop_uid: str, calling_ae: str, defects: str, as_received: bool) -> None:
        log.warning(
            "non-conformant object from %s kept%s: SOP %s: %s",
            calling_ae,
            " as received, not compressed" if as_received else "",
            sop_uid,
            defects,
        )
        self.index.audit("nonconformant", sop_uid=sop_uid, calling_ae=calling_ae, detail=defects)

    @staticmethod
    def _failure_status(exc: Exception, sop_inst: str, calling_ae: str) -> int:
        """0xA700 for a full disk (the sender retries later), 0x0110 for anything else."""
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            log.error("disk full storing SOP %s from %s: %s", sop_inst, calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        log.error("failed to store SOP %s from %s", sop_inst, calling_ae, exc_info=exc)
        return STATUS_PROCESSING_FAILURE

    def _new_job(self, ds: Dataset, sop_uid: str, calling_ae: str) -> Job:
        # A fresh token per version, so a replaced object never shares a path with its successor.
        token = uuid.uuid4().hex[:12]
        incoming = self.archive.incoming_path(sop_uid).replace(".dcm", f"-{token}.dcm")
        stored = self.archive.stored_path(
            uid_value(ds, "StudyInstanceUID"), uid_value(ds, "SeriesInstanceUID"), sop_uid
        ).replace(".dcm", f"-{token}.dcm")
        return Job(sop_uid, incoming, stored, calling_ae)

    def submit(self, job: Job, expected_checksum: str) -> None:
        """Queue a compression job. Never raises: the row stays pending whatever happens
        here, and a pool that broke is made anew."""
        for _ in range(2):
            pool = self.pool
            try:
                future = pool.submit(run_job, job, expected_checksum)
            except BrokenProcessPool:
                self._renew_pool(pool)
                continue
            except RuntimeError as exc:  # shutting down
                log.info("compression of SOP %s not queued (%s): stays pending", job.sop_uid, exc)
                return
            with self._lock:
                self._jobs[future] = (job, expected_checksum, pool)
            future.add_done_callback(self._finish)
            return
        log.error("compression of SOP %s not queued: the worker pool keeps breaking", job.sop_uid)

    def _renew_pool(self, broken: ProcessPoolExecutor) -> None:
        """Replace a pool whose worker died; once, whoever sees it first."""
        with self._lock:
            if self.pool is not broken or self._closing:
                return
            log.error("a compression worker died: starting a new worker pool")
            try:
                self.pool = self._new_pool()
            except Exception:
                log.exception("a new compression worker pool could not be started")
        broken.shutdown(wait=False, cancel_futures=True)

    def _retry_later(self, job: Job, expected_checksum: str) -> None:
        def retry() -> None:
            with self._lock:
                self._retries.discard(timer)
            if not self._closing:
                self.submit(job, expected_checksum)

        timer = threading.Timer(self.config.ingest.retry_seconds, retry)
        timer.daemon = True
        with self._lock:
            self._retries.add(timer)
        timer.start()

    def _finish(self, future: Future) -> None:
        with self._lock:
            job, digest, pool = self._jobs[future]
        try:
            if future.cancelled():
                return  # shutting down: the row stays pending and resumes at the next start
            exc = future.exception()
            if exc is None:
                self._record(future.result())
            elif isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
                # The received copy is safe: try again when there is room, without counting
                # it against the object.
                log.error(
                    "compression of SOP %s: disk full (%s); retrying in %g s",
                    job.sop_uid,
                    exc,
                    self.config.ingest.retry_seconds,
                )
                if self.index.still_pending(job.sop_uid, job.incoming):
                    self._retry_later(job, digest)
            else:
                if isinstance(exc, BrokenProcessPool):
                    self._renew_pool(pool)
                    exc = JobError(f"the worker process died while the job ran or waited ({exc})")
                self._failed(job, digest, exc)
        except Exception:
            log.exception("recording a compression result failed; the object stays pending")
        finally:
            with self._lock:
                self._jobs.pop(future, None)
                self.idle.notify_all()

    def _failed(self, job: Job, digest: str, exc: BaseException) -> None:
        """Count a failed attempt; retry later, or park the object after max_attempts."""
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, JobError) else str(exc)
        limit = self.config.ingest.max_attempts
        state = self.index.record_failure(job.sop_uid, job.incoming, reason, limit)
        if state is None:  # replaced meanwhile: this job's object is gone, nothing to do
            log.info("compression of SOP %s dropped: the object was replaced", job.sop_uid)
        elif state == STATE_PARKED:
            log.error(
                "compression of SOP %s failed %d times, parked (kept as received): %s",
                job.sop_uid,
                limit,
                reason,
            )
            self.index.audit(
                "parked", sop_uid=job.sop_uid, calling_ae=job.calling_ae, detail=reason
            )
        else:
            log.error(
                "compression of SOP %s failed (%s); retrying in %g s",
                job.sop_uid,
                reason,
                self.config.ingest.retry_seconds,
            )
            self._retry_later(job, digest)

    def _record(self, result: JobResult) -> None:
        job = result.job
        stored = self.index.mark_stored(
            job.sop_uid,
            job.incoming,
            blob_path=job.stored,
            stored_transfer_syntax=result.transfer_syntax,
            stored_size=result.size,
            checksum=result.checksum,
            codec=result.codec,
            **({"defects": result.source_error} if result.source_error else {}),
        )
        if not stored:  # replaced while we worked: our output belongs to no row
            self.archive.delete(job.stored)
            return
        self.archive.delete(job.incoming)
        if result.source_error:
            self._flagged(job.sop_uid, job.calling_ae, result.source_error, True)
        ratio = result.received_size / result.size if result.size else 0.0
        log.info(
            "stored SOP %s from %s: codec %s, %d -> %d bytes, ratio %.2f%s",
            job.sop_uid,
            job.calling_ae,
            result.codec,
            result.received_size,
            result.size,
            ratio,
            f" ({'; '.join(result.notes)})" if result.notes else "",
        )
        if result.fallbacks:
            self.index.audit(
                "codec_fallback",
                sop_uid=job.sop_uid,
                calling_ae=job.calling_ae,
                detail="; ".join(result.notes),
            )

    def recover(self) -> int:
        """After a crash: drop half-written temp files and orphans, re-queue pending objects."""
        removed = self.archive.clean_tmp()
        pending = self.index.pending()
        # Orphans are received blobs no row points at (written, never indexed): parked rows
        # point at theirs too, and must keep them.
        wanted = self.index.blob_paths(prefix="incoming/")
        orphans = [p for p in self.archive.incoming_files() if p not in wanted]
        for path in orphans:
            self.archive.delete(path)
        for p in pending:
            token = p.blob_path[p.blob_path.rindex("-") :]  # "-<token>.dcm"
            stored = self.archive.stored_path(
                p.study_instance_uid, p.series_instance_uid, p.sop_instance_uid
            ).replace(".dcm", token)
            self.submit(
                Job(p.sop_instance_uid, p.blob_path, stored, p.calling_ae or ""), p.checksum
            )
        if removed or orphans or pending:
            log.info(
                "recovery: %d temp file(s) and %d orphan(s) removed, %d pending object(s) "
                "re-queued for compression",
                removed,
                len(orphans),
                len(pending),
            )
        return len(pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no compression job is in flight (tests, benchmarks, shutdown)."""
        with self._lock:
            return self.idle.wait_for(lambda: not self._jobs and not self._retries, timeout)

    def shutdown(self) -> None:
        """Let running jobs finish; queued ones stay pending and resume at the next start."""
        self._closing = True
        with self._lock:
            for timer in self._retries:
                timer.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        left = self.index.pending()
        if left:
            log.info(
                "%d object(s) still pending compression; they resume at the next start", len(left)
            )
