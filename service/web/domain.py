"""The web face's one door into the domain: query matching, the instances a request names,
their stored bytes and frames, ingest, and the numbers of the status page.

Why one module: the domain path is being made protocol-free (query exposing its plan and
rows, retrieval preparation returning neutral encoded parts); when that lands only this
module is re-pointed, and nothing else in service/web/ imports query, retrieve, transcode,
ingest or the index. Matching is query.find itself, the code path of C-FIND, never SQL of
the web face's own; the few SQL reads here only count rows for the status page and for the
metadata cache's change check.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from sqlalchemy import func, select

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service import metrics, part10_scan, query, retrieve, syntaxes, wire
from compacs.service.archive_service import ArchiveService
from compacs.service.compress import source_frames
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Instance, Series
from compacs.service.storage.schema import utcnow
from compacs.service.transcode import TranscodeError, transcode, transcode_dataset
from compacs.service.web.series_rows import SeriesRows
from compacs.service.wire import STREAM_CHUNK, Buffer, PixelElement

QueryError = query.QueryError
RetrieveError = retrieve.RetrieveError
EXPLICIT_LE = syntaxes.EXPLICIT_LE
STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_MISMATCH = 0xA900
ACCESS_MARK_SECONDS = 5.0

__all__ = ["Domain", "Instance", "QueryError", "RetrieveError", "TranscodeError"]


@dataclass(frozen=True)
class StoredObject:
    """One instance as read from the archive: its data set (pixel data not parsed yet where
    pydicom defers it) and the syntax its bytes are in. A slice of a series volume comes back
    native (the volume reader decodes only the slice's group)."""

    instance: Instance
    dataset: Dataset
    syntax: str
    raw: bytes


@dataclass(frozen=True)
class Received:
    """What ingest answered for one object, and its UIDs as far as they could be read."""

    status: int
    sop_class: str
    sop_instance: str
    study: str
    series: str


class Domain:
    """What the web face may ask of the archive service."""

    def __init__(self, service: ArchiveService) -> None:
        self.service = service
        self.config = service.config
        self._accessed: set[int] = set()  # retrieved, not yet marked in the index
        self._accessed_lock = threading.Lock()
        self._marked_at = time.monotonic()
        self._flusher: threading.Thread | None = None
        self._series_rows = SeriesRows(service.index.instances_by_series_uid)

    # --- query (QIDO-RS): the C-FIND code path -------------------------------------------
    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        """Matches of a study-root identifier, as C-FIND answers them (raises QueryError)."""
        return query.find(self.service.index, identifier, "study")

    # --- retrieval (WADO-RS) ---------------------------------------------------------------
    def instances(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[Instance]:
        """The instances a WADO-RS path names, by the unique keys C-GET reads."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE" if sop else "SERIES" if series else "STUDY"
        identifier.StudyInstanceUID = study
        if series:
            identifier.SeriesInstanceUID = series
        if sop:
            identifier.SOPInstanceUID = sop
        found = retrieve.matching_instances(self.service.index, identifier)
        self._mark_accessed([i.id for i in found])
        return found

    def instance(self, study: str, series: str, sop: str) -> Instance | None:
        """The one instance a frame path names: from the rows of its series read a moment
        ago (series_rows.py: a viewer asks a frame per request, hundreds in a row), else by
        one Core read of its SOP Instance UID; None unless the path's study and series are
        its own, as `instances` would match them."""
        sop = sop.strip(" \0")
        inst = self._series_rows.get(series.strip(" \0"), sop)
        if inst is None:
            inst = self.service.index.instance_by_uid(sop)
        if (
            inst is None
            or inst.series.series_instance_uid != series.strip(" \0")
            or inst.series.study.study_instance_uid != study.strip(" \0")
        ):
            return None
        self._mark_accessed([inst.id])
        return inst

    def held_instance(self, series: str, sop: str) -> Instance | None:
        """The row of a frame path's instance if it is held already (series_rows.py) and
        reading its frames costs no more than a local file read: no index read, no decode
        of a series volume's group, no object store. The web face then answers on its event
        loop rather than in a worker thread (the hand-over was a tenth of a frame)."""
        rows = self._series_rows.held(series.strip(" \0"))
        inst = rows.get(sop.strip(" \0")) if rows else None
        if inst is None or inst.frame_first is not None:
            return None
        return inst if isinstance(self.service.archives.get(inst.blob.tier), Archive) else None

    def _mark_accessed(self, ids: list[int]) -> None:
        """Retrieved instances are marked accessed (tiers with since = "accessed") in
        batches, at most ACCESS_MARK_SECONDS late: a viewer asks one frame per request,
        and one index write each serialised every frame on the index's write lock (the
        largest cost of a frame in the benchmark). Tiers count in days. The write runs in
        a thread of its own: a frame may be answered on the web face's event loop, which
        must not wait for the index's write lock."""
        with self._accessed_lock:
            self._accessed.update(ids)
            if time.monotonic() - self._marked_at < ACCESS_MARK_SECONDS:
                return
            self._marked_at = time.monotonic()  # one writer per period
            self._flusher = threading.Thread(target=self.flush_accessed, name="compacs-accessed")
            self._flusher.start()

    def stop(self) -> None:
        """When the web face stops, before the archive service closes: the last marks."""
        if self._flusher is not None:
            self._flusher.join(timeout=30)
        self.flush_accessed()

    def flush_accessed(self) -> None:
        """Write the pending access marks."""
        with self._accessed_lock:
            batch, self._accessed = self._accessed, set()
            self._marked_at = time.monotonic()
        if batch:
            self.service.mark_accessed(sorted(batch))

    def read(self, inst: Instance) -> StoredObject:
        raw = self.service.read_instance(inst)
        ds = dcmread(BytesIO(raw))
        return StoredObject(inst, ds, str(ds.file_meta.TransferSyntaxUID), raw)

    def stream(self, inst: Instance) -> tuple[Iterator[bytes], int] | None:
        """A big instance's stored Part-10 bytes (over wire.STREAM_ABOVE), chunk by chunk
        from its blob file, checked against its checksum first, as C-GET sends it; None
        for one to read whole (small, or a slice of a series volume)."""
        opened = self.service.open_instance(inst)
        if opened is None:
            return None
        file, _offset, length = opened

        def chunks() -> Iterator[bytes]:
            with file:
                left = length
                while left:
                    data = file.read(min(STREAM_CHUNK, left))
                    if not data:
                        raise OSError(f"blob of {inst.sop_instance_uid} ended {left} bytes early")
                    left -= len(data)
                    yield data

        return chunks(), length

    def header(self, inst: Instance) -> Dataset:
        """The instance's data set without its pixel data (series metadata). A slice of a
        series volume: its header alone, decoding no frame (reading it whole would decode
        the whole volume for a series' metadata)."""
        if inst.frame_first is not None:
            try:
                return self.service.volumes.header(
                    self.service.archive_for(inst.blob.tier),
                    inst.blob.path,
                    inst.blob_offset,
                    inst.blob_length,
                    inst.checksum,
                )
            except FileNotFoundError:
                pass  # moved meanwhile: read_instance finds the instance again
        raw = self.service.read_instance(inst)
        return dcmread(BytesIO(raw), stop_before_pixels=True)

    @staticmethod
    def candidates(inst: Instance, stored: str | None = None) -> list[str]:
        """Public syntaxes `inst` can be given in, best first (never a private one)."""
        out = retrieve.candidate_syntaxes(inst)
        if stored and stored not in out and not syntaxes.is_private(stored):
            out.insert(0, stored)
        return out

    @staticmethod
    def producible(target: str, stored: str) -> bool:
        return not syntaxes.is_private(target) and syntaxes.producible(target, stored)

    def part10(self, obj: StoredObject, target: str) -> bytes:
        """The object as a Part-10 file in `target` (the stored bytes when it is in it),
        transcoded through the verified runner otherwise."""
        if target == obj.syntax:
            return obj.raw
        return transcode(obj.raw, target)

    def frames(self, obj: StoredObject, numbers: list[int], target: str) -> list[bytes]:
        """Frames `numbers` (1-based) of `obj` in `target`: the stored fragments untouched
        when `target` is the stored syntax, one frame decoded by our codec (not the whole
        object) when native is asked, else the object transcoded. Raises IndexError for a
        frame number the object does not have."""
        ds = obj.dataset
        count = int(ds.get("NumberOfFrames", 1) or 1)
        bad = [n for n in numbers if not 1 <= n <= count]
        if bad:
            raise IndexError(f"frame(s) {bad} out of range: this instance has {count} frame(s)")
        if target == obj.syntax:
            return [self._stored_frame(ds, obj.syntax, n - 1, count) for n in numbers]
        if target in syntaxes.NATIVE:
            codec = registry.by_transfer_syntax(obj.syntax)
            if codec is not None:
                fmt = PixelFormat.from_dataset(ds)
                out = []
                for n in numbers:
                    encoded = self._stored_frame(ds, obj.syntax, n - 1, count)
                    frame = codec.decode_frame(encoded, fmt)
                    out.append(np.ascontiguousarray(frame, fmt.dtype).tobytes())
                return out
            fmt = PixelFormat.from_dataset(ds)
            decoded = source_frames(ds)
            return [np.ascontiguousarray(decoded[n - 1], fmt.dtype).tobytes() for n in numbers]
        converted = transcode_dataset(ds, target)
        return [self._stored_frame(converted, target, n - 1, count) for n in numbers]

    def stored_frames(self, inst: Instance, numbers: list[int], target: str) -> list[Buffer] | None:
        """Frames `numbers` (1-based) of `inst` in `target`, cut from its stored bytes by
        their item headers (wire.read_head parses the header only, never the pixel data):
        views of the stored fragments when `target` is the stored syntax, one frame decoded
        by our codec when native is asked. None where this does not apply (a slice of a
        series volume, a target that needs a transcode, an object replaced meanwhile by one
        in another syntax): the caller then reads the object whole (read, frames). Raises
        IndexError for a frame number the object does not have."""
        stored = inst.stored_transfer_syntax
        codec = None
        if inst.frame_first is not None:
            return None
        if target != stored:
            codec = registry.by_transfer_syntax(stored) if target in syntaxes.NATIVE else None
            if codec is None:
                return None
        raw = self.service.read_instance(inst)
        cut, fmt = self._scanned_frames(inst, raw, numbers)
        if cut is None:  # the bytes read the ordinary way
            ds, element, error = wire.read_head(BytesIO(raw), len(raw))
            if error or element is None or str(ds.file_meta.TransferSyntaxUID) != stored:
                return None
            fmt = PixelFormat.from_dataset(ds)
            _check_frames(numbers, fmt.number_of_frames)
            cut = _cut_frames(raw, element, fmt, numbers)
        if codec is None:
            return cut
        if fmt is None:  # the frames found from their items, the pixel module not
            ds, _, _ = wire.read_head(BytesIO(raw), len(raw))
            fmt = PixelFormat.from_dataset(ds)
        return [
            memoryview(np.ascontiguousarray(codec.decode_frame(bytes(f), fmt), fmt.dtype)).cast("B")
            for f in cut
        ]

    @staticmethod
    def _scanned_frames(
        inst: Instance, raw: bytes, numbers: list[int]
    ) -> tuple[list[Buffer] | None, PixelFormat | None]:
        """The frames (and pixel module) found by part10_scan, where the bytes are in the
        syntax `inst` names and agree with what its row recorded at ingest; (None, None)
        for the ordinary parse."""
        stored = inst.stored_transfer_syntax
        count = inst.number_of_frames or 1  # as recorded at ingest: none given is one
        if not inst.rows or part10_scan.file_syntax(raw) != stored:
            return None, None
        frames = part10_scan.trailing_frames(raw, count)
        if frames is None:
            return None, None
        _check_frames(numbers, count)
        fmt = part10_scan.pixel_format(raw)
        recorded = (inst.rows, inst.columns, inst.bits_stored, count)
        if (
            fmt is not None
            and (fmt.rows, fmt.columns, fmt.bits_stored, fmt.number_of_frames) != recorded
        ):
            fmt = None  # the walk and the row disagree: let pydicom read it
        return [frames[n - 1] for n in numbers], fmt

    @staticmethod
    def _stored_frame(ds: Dataset, syntax: str, index: int, count: int) -> bytes:
        if syntaxes.is_encapsulated(syntax):
            for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=count)):
                if i == index:
                    return frame
            raise IndexError(f"frame {index + 1} missing from the encapsulated pixel data")
        fmt = PixelFormat.from_dataset(ds)
        size = fmt.rows * fmt.columns * fmt.samples_per_pixel * fmt.dtype.itemsize
        return bytes(ds.PixelData[index * size : (index + 1) * size])

    def pixels(self, obj: StoredObject, number: int) -> np.ndarray:
        """Frame `number` (1-based) decoded, for rendered and thumbnail images."""
        fmt = PixelFormat.from_dataset(obj.dataset)
        data = self.frames(obj, [number], EXPLICIT_LE)[0]
        shape = (fmt.rows, fmt.columns) + (
            (fmt.samples_per_pixel,) if fmt.samples_per_pixel > 1 else ()
        )
        return np.frombuffer(data, fmt.dtype).reshape(shape)

    def series_signature(self, series_uid: str) -> tuple[int, int, int]:
        """What changes when a series gains, loses or replaces an instance: the metadata
        cache compares it before answering from memory."""
        with self.service.index.reading() as session:
            row = session.execute(
                select(
                    func.count(Instance.id),
                    func.coalesce(func.max(Instance.id), 0),
                    func.coalesce(func.sum(Instance.version), 0),
                )
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid == series_uid)
            ).one()
        return int(row[0]), int(row[1]), int(row[2])

    # --- ingest (STOW-RS): the C-STORE path --------------------------------------------------
    def receive(self, raw: bytes, caller: str, study: str | None = None) -> Received:
        """Archive one Part-10 object as C-STORE does (acknowledged only when durable).
        `study`: the object must belong to it (STOW-RS to /studies/{study}), else 0xA900
        and nothing is stored."""
        try:
            head = dcmread(BytesIO(raw), stop_before_pixels=True)
            uids = [
                str(head.get(k, "") or "")
                for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            ]
        except Exception:
            return Received(STATUS_CANNOT_UNDERSTAND, "", "", "", "")
        if study is not None and uids[2] != study:
            return Received(STATUS_MISMATCH, *uids)
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(len(raw))
        status = self.service.receive(raw, caller or "DICOMWEB", uids[0], uids[1])
        return Received(status, *uids)

    # --- the status page -------------------------------------------------------------------
    def stats(self) -> dict:
        return self.service.index.stats()

    def tier_backlog(self) -> dict[str, float]:
        """This process' last tier run: what it found due and did not move."""
        out = {}
        for family in metrics.TIER_BACKLOG.collect():
            for sample in family.samples:
                out[sample.labels.get("tier", "?")] = sample.value
        return out

    def associations(self) -> dict[str, float]:
        """Associations since the node started, by result (the metrics counters)."""
        out = {}
        for family in metrics.ASSOCIATIONS.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels.get("result", "?")] = sample.value
        return out

    def recent_senders(self, limit: int = 10) -> list[tuple[str, int, object]]:
        """Calling AE titles (C-STORE and STOW) of the last day: objects and last arrival."""
        since = utcnow() - timedelta(days=1)
        with self.service.index.reading() as session:
            rows = session.execute(
                select(Instance.calling_ae, func.count(Instance.id), func.max(Instance.received_at))
                .where(Instance.received_at >= since)
                .group_by(Instance.calling_ae)
                .order_by(func.max(Instance.received_at).desc())
                .limit(limit)
            ).all()
        return [(ae or "-", n, last) for ae, n, last in rows]

    def ingest_by_hour(self) -> list[int]:
        """Objects received in each of the last 24 hours, oldest first."""
        now = utcnow()
        since = now - timedelta(hours=24)
        with self.service.index.reading() as session:
            times = session.scalars(
                select(Instance.received_at).where(Instance.received_at >= since)
            ).all()
        counts = [0] * 24
        for at in times:
            if at.tzinfo is None:
                at = at.replace(tzinfo=now.tzinfo)
            slot = 23 - int((now - at).total_seconds() // 3600)
            if 0 <= slot < 24:
                counts[slot] += 1
        return counts


def _cut_frames(
    raw: bytes, element: PixelElement, fmt: PixelFormat, numbers: list[int]
) -> list[Buffer]:
    """Frames `numbers` of the pixel data `element` locates in `raw`, as stored. Encapsulated
    (PS3.5 A.4): a single frame is all fragments, one fragment per frame when there are as
    many as frames (views, no copy); otherwise pydicom finds the frames (Basic Offset Table
    or markers)."""
    view = memoryview(raw)
    if element.length is not None:  # native
        size = fmt.rows * fmt.columns * fmt.samples_per_pixel * fmt.dtype.itemsize
        return [view[element.value_at + (n - 1) * size :][:size] for n in numbers]
    fragments = element.items[1:]
    if fmt.number_of_frames == 1:
        whole = [view[at : at + size] for at, size in fragments]
        return [whole[0] if len(whole) == 1 else b"".join(whole) for _ in numbers]
    if len(fragments) == fmt.number_of_frames:
        return [view[fragments[n - 1][0] :][: fragments[n - 1][1]] for n in numbers]
    file = BytesIO(raw)
    file.seek(element.value_at)
    found = list(generate_frames(file, number_of_frames=fmt.number_of_frames))
    return [found[n - 1] for n in numbers]


def _check_frames(numbers: list[int], count: int) -> None:
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise IndexError(f"frame(s) {bad} out of range: this instance has {count} frame(s)")
