"""C-STORE of files to a peer (`compacs send`, and the forwarding of a C-GET pull).

Orthanc stores an object in the syntax of the context it arrived on, and with several
syntaxes in one context it picks the uncompressed one: so we propose one presentation
context per transfer syntax, and files keep their syntax on the way. A file is streamed
from disk undecoded when a context for its exact syntax was accepted; only when the peer
refused that syntax is it decoded and sent uncompressed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from compacs.service.dimse.scu.associations import (
    MAX_CONTEXTS,
    NATIVE_PAIR,
    accepted,
    associate,
    release,
)
from compacs.service.dimse.scu.errors import status_of, status_text
from compacs.service.dimse.scu.peers import Peer
from compacs.service.dimse.scu.progress import Progress, Step, tell
from compacs.service.dimse.scu.switches import send_files_undecoded

DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # DICOMDIR: a file set index, not sent


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class: UID
    sop_instance: str
    transfer_syntax: UID


@dataclass
class StoreResult:
    path: Path
    status: int | None  # None: never answered (no context, association lost)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0 or 0xB000 <= self.status <= 0xBFFF)

    @property
    def warning(self) -> bool:
        return self.ok and self.status != 0

    def describe(self) -> str:
        """``0xA900 (...), error comment``: the status and what we or the peer said."""
        words = status_text(self.status, {}) if self.status is not None else ""
        return ", ".join(x for x in (words, self.message) if x) or "no status"


@dataclass
class SendReport:
    results: list[StoreResult] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    associations: int = 0

    @property
    def sent(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def warnings(self) -> int:
        return sum(r.warning for r in self.results)

    @property
    def failed(self) -> list[StoreResult]:
        return [r for r in self.results if not r.ok]


def _walk(paths: Iterable[Path | str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p


def collect_files(paths: Iterable[Path | str]) -> tuple[list[DicomFile], list[tuple[Path, str]]]:
    """The DICOM Part-10 files among `paths` (folders recursively) and those skipped, why."""
    files: list[DicomFile] = []
    skipped: list[tuple[Path, str]] = []
    for path in _walk(paths):
        if not path.exists():
            skipped.append((path, "no such file or folder"))
            continue
        try:
            meta = read_file_meta_info(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append((path, f"not a DICOM file ({exc})"))
            continue
        missing = [
            kw
            for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
            if not meta.get(kw)
        ]
        if missing:
            skipped.append((path, f"DICOM file meta lacks {', '.join(missing)}"))
            continue
        sop_class = UID(str(meta.MediaStorageSOPClassUID))
        if sop_class == DIRECTORY_SOP_CLASS:
            skipped.append((path, "a DICOMDIR (file-set index), not an object to store"))
            continue
        files.append(
            DicomFile(
                path,
                sop_class,
                str(meta.MediaStorageSOPInstanceUID),
                UID(str(meta.TransferSyntaxUID)),
            )
        )
    return files, skipped


def class_contexts(sop_class: str, syntaxes: Iterable[str]) -> list[PresentationContext]:
    """One context per transfer syntax of the class's files, plus explicit/implicit VR LE
    as the fallback in which a file is sent decoded when the peer refuses its syntax."""
    contexts = [
        build_context(sop_class, [ts])
        for ts in sorted(set(syntaxes))
        if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    ]
    contexts.append(build_context(sop_class, NATIVE_PAIR))
    if ImplicitVRLittleEndian in syntaxes:  # sent unchanged if the peer takes it alone
        contexts.append(build_context(sop_class, [ImplicitVRLittleEndian]))
    return contexts


def plan_associations(
    files: Sequence[DicomFile],
) -> list[tuple[list[PresentationContext], list[DicomFile]]]:
    """Files grouped into associations of at most MAX_CONTEXTS contexts (all contexts of a
    SOP class in the same association), in the order the files were given."""
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for f in files:
        syntaxes[f.sop_class].add(f.transfer_syntax)
    plans: list[tuple[list[PresentationContext], set[str]]] = []
    for sop_class in dict.fromkeys(f.sop_class for f in files):  # first-seen order
        contexts = class_contexts(sop_class, syntaxes[sop_class])
        if not plans or len(plans[-1][0]) + len(contexts) > MAX_CONTEXTS:
            plans.append(([], set()))
        plans[-1][0].extend(contexts)
        plans[-1][1].add(sop_class)
    return [(contexts, [f for f in files if f.sop_class in classes]) for contexts, classes in plans]


def store_file(assoc: Association, f: DicomFile, accepted: set[tuple[str, str]]) -> StoreResult:
    """C-STORE one file: streamed unchanged when its syntax was accepted, else decoded to
    explicit VR LE (when that, or implicit VR LE, was accepted)."""
    if (f.sop_class, f.transfer_syntax) in accepted:
        with send_files_undecoded():
            rsp = assoc.send_c_store(f.path)
        note = ""
    elif any((f.sop_class, ts) in accepted for ts in NATIVE_PAIR):
        from compacs.service.transcode import TranscodeError, transcode_dataset

        try:
            ds = transcode_dataset(dcmread(f.path), ExplicitVRLittleEndian)
        except (TranscodeError, OSError, ValueError, InvalidDicomError) as exc:
            why = f"peer refused {f.transfer_syntax.name} and decoding failed: {exc}"
            return StoreResult(f.path, None, why)
        rsp = assoc.send_c_store(ds)
        note = f"peer refused {f.transfer_syntax.name}: sent uncompressed"
    else:
        return StoreResult(
            f.path,
            None,
            f"peer accepted no presentation context for {f.sop_class.name} ({f.sop_class})",
        )
    status, comment = status_of(rsp)
    if status is None:
        return StoreResult(f.path, None, "no response (association aborted or timed out)")
    message = "; ".join(x for x in (note, comment) if x)
    return StoreResult(f.path, status, message)


def send_files(
    paths: Iterable[Path | str], peer: Peer, calling_ae: str, progress: Progress | None = None
) -> SendReport:
    """C-STORE the DICOM files under `paths` to `peer`; per-file results in the report,
    each file (and each skipped one) told to `progress` as it goes."""
    files, skipped = collect_files(paths)
    report = SendReport(skipped=skipped)
    for path, why in skipped:
        tell(progress, Step(0, len(files), f"skipped {path}: {why}"))
    for contexts, group in plan_associations(files):
        assoc = associate(calling_ae, peer, contexts)
        report.associations += 1
        taken = accepted(assoc)
        try:
            for f in group:
                if not assoc.is_established:
                    result = StoreResult(f.path, None, "association lost")
                else:
                    result = store_file(assoc, f, taken)
                report.results.append(result)
                done = len(report.results)
                if not result.ok:
                    note = f"FAILED {f.path}: {result.describe()}"
                    tell(progress, Step(done, len(files), note, failure=True))
                else:
                    note = f"{f.path}: {result.message}" if result.message else ""
                    tell(progress, Step(done, len(files), note))
        finally:
            release(assoc)
    return report
