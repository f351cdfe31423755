"""From a received object to an acknowledged, archived and indexed one.

The acknowledgement waits only for what invariant 1 needs: the object as received is
durably on disk and its index row is committed (state "pending", claimed by this process).
Compression, bit-exact verification and the swap to the compressed blob happen afterwards
(jobs.py); docs/design.md measured this split at about twice the rate of compressing before the
ack on one association. Once the row is committed the answer is Success, whatever happens to
the compression job.

When several senders store at once, the CPU is the limit rather than each sender's wait, and
writing every object twice (as received, then compressed), indexing it twice and reading it
back cost a good part of it (4 associations: 27.1 CPU ms per image that way, 23.6 this way,
docs/benchmarks.md): then, while no backlog waits for the workers, an object is
compressed and verified before its ack instead (`[ingest] compress_before_ack_from`), written
once, compressed, and indexed once, as stored. Invariant 1 holds the same way: the ack
follows the durable write and the committed row. Anything that goes wrong on that path
(no worker free, a failed attempt, a worker that dies) sends the object down the default
path instead, so it is never refused for it.

A big data set arrives spooled to a file (dimse/receive_limits): it is parsed from the file
without its pixel data (parse_file: the Pixel Data element's headers are read, its value
never), hashed in one streamed pass and made the blob by a hard link or a streamed copy, so
that the node's memory does not grow with the object.

What is checked, refused or kept flagged is validate.py's to say; this module parses,
recognises re-sends (the same data set, or a changed one: `[node] on_duplicate`), writes
the blob at a fresh path and indexes it. Two associations or processes receiving the same
SOP Instance UID at once are told apart by the index's unique key: the second is treated
as a re-send of the first.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from compacs.codecs import registry
from compacs.service import metrics, rules
from compacs.service.config import NodeConfig
from compacs.service.jobs import Jobs
from compacs.service.storage.archive import (
    Archive,
    checksum,
    disk_full,
    file_checksums,
    new_token,
)
from compacs.service.storage.index import (
    Claim,
    DuplicateInstance,
    Index,
    NewBlob,
    ReceivedVersion,
)
from compacs.service.storage.schema import STATE_STORED, utcnow
from compacs.service.stored_report import flagged, report_stored
from compacs.service.validate import (
    IDENTITY_UIDS,
    PIXELS,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    BadInput,
    Defect,
    PixelExtent,
    inspect,
    uid_value,
)
from compacs.service.wire import STREAM_ABOVE

log = logging.getLogger("compacs.ingest")

STATUS_SUCCESS = 0x0000
_RACES = 3  # a re-send decision retried when another process changed the row meanwhile
SENDER_WINDOW = 0.25  # s: a thread that began an object this recently is an active sender


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


def parse_file(path: Path) -> tuple[Dataset, list[Defect], PixelExtent | None]:
    """A spooled data set, read from its file up to its Pixel Data, whose value is located
    and measured from its headers (wire.read_head) but never read: the extent found is what
    validate checks. A Pixel Data element whose headers are malformed or run past the end
    of the file is a PIXELS defect, as `parse` finds for such bytes in memory."""
    from compacs.service.wire import read_head

    with open(path, "rb") as file:
        try:
            ds, element, error = read_head(file, path.stat().st_size)
        except Exception as exc:
            raise BadInput(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be read: {exc}") from exc
        if UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_deflated:
            # no offsets in the file to locate pixel data by: parsed in memory, as before
            file.seek(0)
            return (*parse(file.read()), None)
        file.seek(0)
        defects = _encoding_defects(file.read(1 << 16), ds)
    if error is not None:
        return ds, [Defect(PIXELS, error), *defects], None
    if element is None:
        return ds, defects, None
    return ds, defects, PixelExtent(element.length, element.fragments)


def _encoding_defects(raw: bytes, ds: Dataset) -> list[Defect]:
    """A data set in implicit VR under an explicit VR syntax, or the other way round: pydicom
    reads it as found (and warns), but such bytes trip up other readers and writers."""
    from compacs.service.wire import dataset_start

    said = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    if said.is_private or not said.is_transfer_syntax or said.is_deflated:
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


@dataclass(frozen=True)
class _Spooled:
    """A big received data set: its spool file, size and checksums (see _file_hashes)."""

    path: Path
    size: int
    checksum: str
    dataset_hash: str


def _file_hashes(path: Path) -> tuple[int, str, str]:
    """Size, blob checksum and dataset_hash of a spooled file, in one streamed pass."""
    from compacs.service.wire import dataset_start

    with open(path, "rb") as file:
        start = dataset_start(file.read(1 << 16))
    whole, data_set = file_checksums(path, start)
    return path.stat().st_size, whole, data_set


class Ingest:
    """Receives objects for the SCP (one thread per association) and hands each to the
    compression jobs."""

    def __init__(self, config: NodeConfig, archive: Archive, index: Index, jobs: Jobs) -> None:
        self.config = config
        self.archive = archive
        self.index = index
        self.jobs = jobs
        self._senders: dict[int, float] = {}  # receiving thread -> when it last began one
        self._senders_lock = threading.Lock()
        # Whether any rule may derive a lossy instance (a bounded-error codec): such objects
        # take the default path, where jobs.py records the derived instance.
        self._bounded = any(
            registry.get(choice.name).error_bound(choice.params)
            for rule in config.rules
            for choice in rule.codecs
        )

    def receive(self, raw: bytes | Path, calling_ae: str, sop_class: str, sop_inst: str) -> int:
        """Archive one object (its bytes, or the file a big one was spooled to) and return
        the C-STORE status to answer."""
        try:
            if isinstance(raw, Path):
                ds, defects, extent = parse_file(raw)
            else:
                (ds, defects), extent = parse(raw), None
            defects += inspect(ds, sop_class, sop_inst, extent)
            if defects and self.config.ingest.strict:
                raise BadInput(
                    STATUS_DATASET_MISMATCH,
                    "; ".join(d.text for d in defects) + " ([ingest] strict = true)",
                )
            if isinstance(raw, Path):
                received = _Spooled(raw, *_file_hashes(raw))
                received_hash = received.dataset_hash
            else:
                received, received_hash = raw, dataset_hash(raw)
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
        now = self._compress_now(received, defects)
        try:
            for _ in range(_RACES):
                existing = self.index.received_version(sop_inst)
                if (
                    existing is None
                    and now
                    and self._store_compressed(
                        received, ds, defects, received_hash, calling_ae, sop_class
                    )
                ):
                    return STATUS_SUCCESS
                if existing is not None and not self._take_resend(
                    existing,
                    received_hash,
                    str(ds.file_meta.TransferSyntaxUID),
                    calling_ae,
                    sop_inst,
                ):
                    return STATUS_SUCCESS
                claim = self._archive(
                    received, ds, defects, received_hash, existing, calling_ae, sop_class
                )
                if claim is not False:
                    break
            else:
                raise RuntimeError(f"SOP {sop_inst} kept changing while it was stored")
        except Exception as exc:
            return self._failure_status(exc, sop_inst, calling_ae)
        if claim is not None:
            self.jobs.submit(claim)  # never raises: the object is safe whatever happens
        return STATUS_SUCCESS

    def _compress_now(self, received: bytes | _Spooled, defects: list[Defect]) -> bool:
        """Whether this arrival is compressed before its ack: when several senders store at
        once ([ingest] compress_before_ack_from; a sender is a thread that began an object
        in the last SENDER_WINDOW seconds), so that the CPU goes further (one durable write
        per object, one index write, no re-read); one sender alone gets its ack sooner
        from the default path. Never for a big object (spooled, or over wire.STREAM_ABOVE
        where a larger [limits] spool_dataset_bytes keeps it in memory), which workers
        compress from its file frame by frame, nor for one kept as received."""
        least = self.config.ingest.compress_before_ack_from
        if not least:
            return False
        now = time.monotonic()
        with self._senders_lock:
            self._senders[threading.get_ident()] = now
            if len(self._senders) >= least:
                for ident, began in list(self._senders.items()):
                    if now - began > SENDER_WINDOW:
                        del self._senders[ident]
            senders = len(self._senders)
        return (
            senders >= least
            and isinstance(received, bytes)
            and len(received) <= STREAM_ABOVE  # bigger: workers stream it from its file
            and not any(d.kind == PIXELS for d in defects)
        )

    def _may_derive(self, ds: Dataset, calling_ae: str) -> bool:
        """Whether the rule for this object names a bounded-error codec."""
        if not self._bounded:
            return False
        rule = rules.select(self.config.rules, rules.object_attributes(ds, calling_ae))
        return rule is not None and any(
            registry.get(c.name).error_bound(c.params) for c in rule.codecs
        )

    def _store_compressed(
        self,
        raw: bytes,
        ds: Dataset,
        defects: list[Defect],
        received_hash: str,
        calling_ae: str,
        sop_class: str,
    ) -> bool:
        """Compress, verify and write a new object in a worker, then index it as stored, all
        before the ack: True when done; False when it was not (no worker free, the attempt
        failed, a bounded-error rule, the same SOP Instance indexed meanwhile), leaving
        nothing behind for the default path to trip over."""
        if self._may_derive(ds, calling_ae):
            return False
        sop = uid_value(ds, "SOPInstanceUID")
        study, series = uid_value(ds, "StudyInstanceUID"), uid_value(ds, "SeriesInstanceUID")
        stored = self.archive.stored_path(study, series, sop, new_token())
        result = self.jobs.compress_now(raw, calling_ae, stored)
        if result is None:
            return False
        if result.derived is not None:  # (a rule changed meanwhile) jobs.py records these
            self.archive.delete(stored)
            return False
        found = [d.text for d in defects] + ([result.source_error] if result.source_error else [])
        received_ts = str(ds.file_meta.TransferSyntaxUID)
        try:
            self.index.add_received(
                ds,
                NewBlob(stored, result.size, result.checksum),
                None,
                None,
                calling_ae=calling_ae,
                sop_class_uid=uid_value(ds, "SOPClassUID") or sop_class,
                received_transfer_syntax=received_ts,
                received_size=len(raw),
                received_hash=received_hash,
                stored_transfer_syntax=result.transfer_syntax,
                stored_size=result.size,
                defects="; ".join(found) or None,
                state=STATE_STORED,
                codec=result.codec,
                stored_at=utcnow(),
            )
        except DuplicateInstance:
            self.archive.delete(stored)
            return False
        except BaseException:
            self.archive.delete(stored)
            raise
        if found:
            flagged(self.index, sop, calling_ae, "; ".join(found), result.codec == "passthrough")
        report_stored(self.index, result, sop, calling_ae)
        return True

    def _take_resend(
        self, existing: ReceivedVersion, received_hash: str, ts: str, calling_ae: str, sop: str
    ) -> bool:
        """Whether a re-sent SOP Instance replaces the one held (else it is acknowledged)."""
        if existing.received_hash == received_hash and existing.received_transfer_syntax == ts:
            log.info("duplicate from %s: SOP %s already stored, same data set", calling_ae, sop)
            return False
        if self.config.on_duplicate == "keep_first":
            log.warning(
                "re-sent from %s with different content: SOP %s; keeping the first "
                "(on_duplicate = keep_first)",
                calling_ae,
                sop,
            )
            self.index.audit("duplicate_kept_first", sop_uid=sop, calling_ae=calling_ae)
            return False
        return True

    def _archive(
        self,
        raw: bytes | _Spooled,
        ds: Dataset,
        defects: list[Defect],
        received_hash: str,
        existing: ReceivedVersion | None,
        calling_ae: str,
        sop_class: str,
    ) -> Claim | None | bool:
        """Write the blob and index it: the claim to compress, None when the object is kept
        as received, False when another writer got there first (the caller decides again)."""
        sop = uid_value(ds, "SOPInstanceUID")
        study, series = uid_value(ds, "StudyInstanceUID"), uid_value(ds, "SeriesInstanceUID")
        # An object whose pixel data disagrees with its attributes is kept exactly as
        # received: decoding it would read something other than what was sent.
        keep_as_received = any(d.kind == PIXELS for d in defects)
        token = new_token()
        path = (
            self.archive.stored_path(study, series, sop, token)
            if keep_as_received
            else self.archive.incoming_path(sop, token)
        )
        if isinstance(raw, _Spooled):
            self.archive.adopt(path, raw.path)
            blob = NewBlob(path, raw.size, raw.checksum)
        else:
            blob = NewBlob(path, len(raw), self.archive.write(path, raw))
        received_ts = str(ds.file_meta.TransferSyntaxUID)
        fields = dict(
            calling_ae=calling_ae,
            sop_class_uid=uid_value(ds, "SOPClassUID") or sop_class,
            received_transfer_syntax=received_ts,
            received_size=blob.size,
            received_hash=received_hash,
            stored_transfer_syntax=received_ts,
            stored_size=blob.size,
            defects="; ".join(d.text for d in defects) or None,
        )
        if keep_as_received:
            fields.update(state=STATE_STORED, codec="passthrough")
        owner, until = (
            (None, None) if keep_as_received else (self.jobs.owner, self.jobs.lease_until())
        )
        try:
            if existing is None:
                instance_id, version = self.index.add_received(ds, blob, owner, until, **fields), 0
            elif self.index.replace_received(ds, existing, blob, owner, until, **fields):
                instance_id, version = existing.instance_id, existing.version + 1
                self.index.audit("replaced", sop_uid=sop, calling_ae=calling_ae)
                log.warning(
                    "re-sent from %s with different content: SOP %s replaced "
                    "(on_duplicate = replace)",
                    calling_ae,
                    sop,
                )
            else:
                self.archive.delete(path)  # never indexed: must not linger
                return False
        except DuplicateInstance:
            self.archive.delete(path)
            return False
        except BaseException:
            self.archive.delete(path)
            raise
        if defects:
            flagged(self.index, sop, calling_ae, fields["defects"], keep_as_received)
        if keep_as_received:
            metrics.count_stored(
                "passthrough", metrics.modality_label(ds.get("Modality")), blob.size, blob.size
            )
            return None
        return Claim(instance_id, sop, version, path, blob.checksum, calling_ae, study, series)

    @staticmethod
    def _failure_status(exc: Exception, sop_inst: str, calling_ae: str) -> int:
        """0xA700 for a full disk (the sender retries later), 0x0110 for anything else."""
        if disk_full(exc):
            log.error("disk full storing SOP %s from %s: %s", sop_inst, calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        log.error("failed to store SOP %s from %s", sop_inst, calling_ae, exc_info=exc)
        return STATUS_PROCESSING_FAILURE
