"""From a received object to an acknowledged, archived, indexed and compressed one.

The acknowledgement waits only for what invariant 1 needs: the object as received is
durably on disk and its index row is committed (state "pending"). Compression, bit-exact
verification and the swap to the compressed blob happen afterwards in worker processes
(pyjpegls holds the GIL, so threads would cap at one core); DESIGN.md measured this split
at about twice the rate of compressing before the ack. A crash at any point leaves either
a pending row with its received blob (compressed again at the next start) or a stored
row with its compressed blob; `recover` cleans what a crash left half-done.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import multiprocessing
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread

from compacs.service import rules as rules_mod
from compacs.service.compress import compress
from compacs.service.config import NodeConfig
from compacs.service.storage.archive import Archive, ChecksumError, checksum
from compacs.service.storage.index import Index
from compacs.service.validate import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    BadInput,
    check_dataset,
)

log = logging.getLogger("compacs.ingest")

STATUS_SUCCESS = 0x0000
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RETRY_SECONDS = 10


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


# --- worker process side -------------------------------------------------------------
_worker: dict = {}


def _worker_init(archive_root: str, rules: list[rules_mod.Rule]) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
    )


# --- node side --------------------------------------------------------------------------
class Ingest:
    """Receives objects for the SCP and drives the compression workers."""

    def __init__(self, config: NodeConfig, archive: Archive, index: Index) -> None:
        self.config = config
        self.archive = archive
        self.index = index
        self.pool = ProcessPoolExecutor(
            max_workers=config.effective_workers,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded server
            initializer=_worker_init,
            initargs=(str(archive.root), config.rules),
        )
        # Start every worker now: each spends about a second importing its libraries, which
        # would otherwise land on the first images received (and in ingest benchmarks).
        for warm in [self.pool.submit(_warm_up) for _ in range(config.effective_workers)]:
            warm.result()
        self._jobs: dict[Future, tuple[Job, str]] = {}  # in flight, with the checksum to check
        self._retries: set[threading.Timer] = set()
        self._closing = False
        self._lock = threading.Lock()
        self.idle = threading.Condition(self._lock)

    # called by the C-STORE handler, one thread per association
    def receive(
        self, raw: bytes, ds: Dataset, calling_ae: str, sop_class: str, sop_inst: str
    ) -> int:
        """Archive one object and return the C-STORE status to answer."""
        try:
            check_dataset(ds, sop_class, sop_inst)
            pixel_hash = _pixel_hash(ds)
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
        try:
            existing = self.index.received_version(sop_inst)
            if existing is not None:
                same = (
                    existing.received_pixel_hash == pixel_hash
                    and existing.received_transfer_syntax == received_ts
                )
                if same:
                    log.info(
                        "duplicate from %s: SOP %s already stored, same pixels",
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
            orphan = job.incoming
            digest = self.archive.write(job.incoming, raw)
            fields = dict(
                calling_ae=calling_ae,
                received_transfer_syntax=received_ts,
                received_size=len(raw),
                received_pixel_hash=pixel_hash,
                stored_transfer_syntax=received_ts,
                stored_size=len(raw),
                blob_path=job.incoming,
                checksum=digest,
            )
            if existing is None:
                self.index.add_received(ds, **fields)
            else:
                self.index.replace_received(sop_inst, **fields)
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
        except Exception as exc:
            if orphan is not None:  # never acknowledged nor indexed: must not linger
                self.archive.delete(orphan)
            return self._failure_status(exc, sop_inst, calling_ae)
        self.submit(job, digest)
        return STATUS_SUCCESS

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
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop_uid
        ).replace(".dcm", f"-{token}.dcm")
        return Job(sop_uid, incoming, stored, calling_ae)

    def submit(self, job: Job, expected_checksum: str) -> None:
        future = self.pool.submit(run_job, job, expected_checksum)
        with self._lock:
            self._jobs[future] = (job, expected_checksum)
        future.add_done_callback(self._finish)

    def _retry_later(self, job: Job, expected_checksum: str) -> None:
        def retry() -> None:
            with self._lock:
                self._retries.discard(timer)
            if not self._closing:
                self.submit(job, expected_checksum)

        timer = threading.Timer(RETRY_SECONDS, retry)
        timer.daemon = True
        with self._lock:
            self._retries.add(timer)
        timer.start()

    def _finish(self, future: Future) -> None:
        try:
            if future.cancelled():
                return  # shutting down: the row stays pending and resumes at the next start
            exc = future.exception()
            if exc is None:
                self._record(future.result())
            elif isinstance(exc, OSError) and not isinstance(exc, ChecksumError):
                # Disk full or another I/O error: the received copy is safe; try again later.
                job, digest = self._jobs[future]
                log.error(
                    "compression of SOP %s failed (%s); retrying in %d s",
                    job.sop_uid,
                    exc,
                    RETRY_SECONDS,
                )
                self._retry_later(job, digest)
            else:
                log.error("compression job failed, object stays as received (pending): %s", exc)
        except Exception:
            log.exception("recording a compression result failed; the object stays pending")
        finally:
            with self._lock:
                self._jobs.pop(future, None)
                self.idle.notify_all()

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
        )
        if not stored:  # replaced while we worked: our output belongs to no row
            self.archive.delete(job.stored)
            return
        self.archive.delete(job.incoming)
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
        wanted = {p.blob_path for p in pending}
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


def _pixel_hash(ds: Dataset) -> str | None:
    """Identity of the pixel data as received, to tell a harmless re-send from a changed one."""
    if "PixelData" not in ds:
        return checksum(str(ds.SOPInstanceUID).encode())
    return "sha256:" + hashlib.sha256(ds["PixelData"].value).hexdigest()
