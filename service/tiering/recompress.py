"""What a tier move computes, in a worker process: the objects read back, recompressed by the
tier's codecs, verified bit-exact, the chosen result written durably to the tier's root.

Nothing here touches the index: the node records a result only if the objects did not
change meanwhile (moves.py), and deletes the files otherwise. A kill at any point leaves the
old blobs as they were, and at most new files no row points at (removed at the next start).

Candidates, for one instance: each frame codec of the tier over its frames (Part-10 in that
codec's syntax), and for a multi-frame instance each volume codec over all its frames
(Part-10 in the codec's private syntax, the volume in one fragment). For a series packed as a
volume: each volume codec over the slices in slice order (one series volume blob), against
each frame codec over every slice (one blob per instance). `first` takes the first that
qualifies and verifies, `smallest` the smallest verified of all: it costs CPU but suits a
cold tier (HEVC beats per-frame codecs on US cine, loses to JPEG-XL on CT and MR series;
learnvol beats both on overlapping CT slices, at about a second per 512² slice each way).
A result that is not smaller than what is stored is not kept: the stored bytes move as they
are.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.codecs.volume import encode_verified
from compacs.service.compress import (
    NOT_A_CODEC_FAILURE,
    encoded_dataset,
    part10,
    source_frames,
    with_frames,
)
from compacs.service.rules import CodecChoice
from compacs.service.storage.archive import checksum, new_token
from compacs.service.storage.blobstore import BlobStore, StoreSpec
from compacs.service.storage.schema import KIND_INSTANCE, KIND_VOLUME
from compacs.service.storage.stores import open_store
from compacs.service.tiering import volumes

AS_STORED = "as stored"


@dataclass(frozen=True)
class Source:
    """Where one instance's stored bytes are (an index row's reference)."""

    instance_id: int
    version: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    store: StoreSpec
    path: str
    offset: int
    length: int
    checksum: str
    frame_first: int | None
    codec: str | None
    stored_transfer_syntax: str
    stored_size: int


@dataclass(frozen=True)
class Task:
    kind: str  # "instance" or "series"
    tier: str
    store: StoreSpec
    codecs: tuple[CodecChoice, ...]
    choose: str
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Placed:
    """One instance's new reference."""

    instance_id: int
    version: int
    blob: int  # index into Output.blobs
    offset: int
    length: int
    checksum: str
    frame_first: int | None
    stored_size: int
    transfer_syntax: str
    codec: str


@dataclass(frozen=True)
class Output:
    blobs: tuple[tuple[str, int, str, str], ...]  # (path, size, checksum, kind), written
    placed: tuple[Placed, ...]
    notes: tuple[str, ...]
    bytes_before: int


def init_worker(log_format: str = "text") -> None:
    """A tier worker runs at the lowest priority: ingest keeps the CPU (the share is also
    capped by pauses between moves, moves.py)."""
    with contextlib.suppress(OSError):
        os.nice(19)
    from compacs.service import logs
    from compacs.service.logs import quiet_decoder_tracebacks

    logs.configure_worker(log_format)
    quiet_decoder_tracebacks()
    with contextlib.suppress(ImportError):  # without it the learned codecs are unavailable
        from compacs.models.runtime import set_default_threads

        set_default_threads(1)  # ONNX Runtime sessions: one thread, as the worker has one core


@functools.cache
def _store(spec: StoreSpec) -> BlobStore:
    """One store per root in a worker: a bucket's client is made once, not per object."""
    return open_store(spec)


def read_source(src: Source, reader: volumes.VolumeReader) -> bytes:
    root = _store(src.store)
    if src.frame_first is not None:
        return reader.slice_part10(
            root,
            src.path,
            src.offset,
            src.length,
            src.checksum,
            src.frame_first,
            src.codec or "",
        )
    return root.read_range(src.path, src.offset, src.length, src.checksum)


def run(task: Task) -> Output:
    reader = volumes.VolumeReader()
    datasets = [dcmread(BytesIO(read_source(s, reader))) for s in task.sources]
    before = sum(s.stored_size for s in task.sources)
    if task.kind == "series":
        return _series(task, datasets, before)
    (ds,) = datasets
    return _instance(task, task.sources[0], ds, before)


def _candidates_for_instance(
    task: Task, ds: Dataset, frames: list[np.ndarray], notes: list[str]
) -> list[tuple[str, bytes, str]]:
    """(codec, Part-10 bytes, syntax) per codec that qualifies and verifies, in order; the
    first only, unless the tier chooses the smallest."""
    fmt = PixelFormat.from_dataset(ds)
    found: list[tuple[str, bytes, str]] = []
    for choice in task.codecs:
        try:
            if choice.name in registry.volume_names():
                volume = registry.get_volume(choice.name)
                reason = (
                    "a single frame"
                    if len(frames) < 2
                    else volume.unsupported_reason(fmt)
                    or volume.data_unsupported_reason(frames, fmt)
                )
                if reason:
                    notes.append(f"{choice.name}: {reason}")
                    continue
                stream = encode_verified(volume, frames, fmt, **choice.params)
                data = part10(with_frames(ds, volume, [stream], fmt))
                found.append((volume.name, data, volume.transfer_syntax_uid))
            else:
                codec = registry.get(choice.name)
                reason = codec.unsupported_reason(fmt) if codec.is_available() else "not available"
                if reason:
                    notes.append(f"{choice.name}: {reason}")
                    continue
                data = part10(encoded_dataset(ds, codec, frames, choice.params))
                found.append((codec.name, data, codec.transfer_syntax_uid))
        except BaseException as exc:  # a codec that fails falls through (x265's wrong frames)
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            notes.append(f"{choice.name} failed: {type(exc).__name__}: {exc}")
            continue
        if task.choose == "first":
            break
    return found


def _instance(task: Task, src: Source, ds: Dataset, before: int) -> Output:
    notes: list[str] = []
    archive = _store(task.store)
    if "PixelData" in ds:
        frames = [np.asarray(f) for f in source_frames(ds)]
        found = _candidates_for_instance(task, ds, frames, notes)
    else:
        found = []
    best = min(found, key=lambda c: len(c[1])) if found else None
    if best is None or len(best[1]) >= src.stored_size:
        if best is not None:
            notes.append(f"{best[0]}: no gain ({len(best[1])} >= {src.stored_size} bytes)")
        # the stored bytes move as they are (a slice read out of a volume: as native pixels)
        data = read_source(src, volumes.VolumeReader())
        syntax = str(dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
        best = ((src.codec or AS_STORED) if src.frame_first is None else "native", data, syntax)
    name, data, syntax = best
    path, digest = _write_new(archive, task, src, src.sop_instance_uid, data)
    placed = Placed(
        src.instance_id, src.version, 0, 0, len(data), digest, None, len(data), syntax, name
    )
    return Output(((path, len(data), digest, KIND_INSTANCE),), (placed,), tuple(notes), before)


def slice_order(datasets: list[Dataset]) -> list[int]:
    """Slices along their normal (Image Position on the normal of Image Orientation), else
    by Instance Number, else as received."""

    def key(i: int) -> tuple:
        ds = datasets[i]
        try:
            o = [float(v) for v in ds.ImageOrientationPatient]
            p = [float(v) for v in ds.ImagePositionPatient]
            normal = np.cross(o[:3], o[3:])
            return (0, float(np.dot(normal, p)), i)
        except (AttributeError, TypeError, ValueError):
            number = ds.get("InstanceNumber")
            return (1, int(number) if number not in (None, "") else 0, i)

    return sorted(range(len(datasets)), key=key)


def _series(task: Task, datasets: list[Dataset], before: int) -> Output:
    notes: list[str] = []
    order = slice_order(datasets)
    frames_by = [[np.asarray(f) for f in source_frames(ds)] for ds in datasets]
    fmt = PixelFormat.from_dataset(datasets[0])
    volume_frames = [frames_by[i][0] for i in order]
    archive = _store(task.store)
    results: list[tuple[str, Output]] = []
    for choice in task.codecs:
        try:
            if choice.name in registry.volume_names():
                volume = registry.get_volume(choice.name)
                reason = volume.unsupported_reason(fmt) or volume.data_unsupported_reason(
                    volume_frames, fmt
                )
                if reason:
                    notes.append(f"{choice.name}: {reason}")
                    continue
                stream = encode_verified(volume, volume_frames, fmt, **choice.params)
                results.append((volume.name, _pack(task, archive, datasets, order, stream, volume)))
            else:
                results.append(
                    (choice.name, _per_instance(task, archive, datasets, frames_by, choice))
                )
        except BaseException as exc:
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            notes.append(f"{choice.name} failed: {type(exc).__name__}: {exc}")
            continue
        if task.choose == "first":
            break
    if not results:
        raise RuntimeError("no codec of the tier takes this series: " + "; ".join(notes))
    size = {name: sum(b[1] for b in out.blobs) for name, out in results}
    _best_name, best = min(results, key=lambda r: size[r[0]])
    for _name, out in results:  # the losers' files were written too: nobody points at them
        if out is not best:
            for path, *_ in out.blobs:
                archive.delete(path)
    notes.extend(f"{name}: {size[name]} bytes" for name, _ in results)
    return Output(best.blobs, best.placed, tuple(notes), before)


def _pack(task: Task, archive: BlobStore, datasets, order, stream: bytes, volume) -> Output:  # noqa: ANN001
    headers = [volumes.header_of(datasets[i]) for i in order]
    blob, spans = volumes.pack(stream, headers)
    first = task.sources[order[0]]
    path, digest = _write_new(archive, task, first, f"volume:{first.series_instance_uid}", blob)
    share = len(stream) // max(1, len(order))
    placed = tuple(
        Placed(
            task.sources[i].instance_id,
            task.sources[i].version,
            0,
            offset,
            length,
            checksum(headers[k]),
            k,
            length + share,
            volume.transfer_syntax_uid,
            volume.name,
        )
        for k, (i, (offset, length)) in enumerate(zip(order, spans, strict=True))
    )
    return Output(((path, len(blob), digest, KIND_VOLUME),), placed, (), 0)


def _per_instance(  # noqa: ANN001
    task: Task, archive: BlobStore, datasets, frames_by, choice: CodecChoice
) -> Output:
    codec = registry.get(choice.name)
    fmt = PixelFormat.from_dataset(datasets[0])
    reason = codec.unsupported_reason(fmt) if codec.is_available() else "not available"
    if reason:
        raise ValueError(reason)
    blobs, placed = [], []
    for k, (src, ds, frames) in enumerate(zip(task.sources, datasets, frames_by, strict=True)):
        data = part10(encoded_dataset(ds, codec, frames, choice.params))
        path, digest = _write_new(archive, task, src, src.sop_instance_uid, data)
        blobs.append((path, len(data), digest, KIND_INSTANCE))
        placed.append(
            Placed(
                src.instance_id,
                src.version,
                k,
                0,
                len(data),
                digest,
                None,
                len(data),
                codec.transfer_syntax_uid,
                codec.name,
            )
        )
    return Output(tuple(blobs), tuple(placed), (), 0)


def _write_new(
    archive: BlobStore, task: Task, src: Source, name: str, data: bytes
) -> tuple[str, str]:
    """A new blob on the tier, under a fresh token so that it never overwrites a file some
    row still points at (a kill before the switch leaves it unreferenced); (path, digest)."""
    path = archive.stored_path(
        src.study_instance_uid, src.series_instance_uid, name, new_token(), task.tier
    )
    return path, archive.write(path, data)
