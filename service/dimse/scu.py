"""We as a DICOM SCU: send files (C-STORE), query (C-FIND), pull a study (C-MOVE or C-GET).

What shaped this module (see docs/design.md, "Real peers"):
- Orthanc answers a C-GET/C-MOVE in the syntax of a context it accepted, and with several
  syntaxes in one context it picks the uncompressed one: so we propose one presentation
  context per transfer syntax wherever we can, and files keep their syntax on the way.
- Files are sent as they are: pynetdicom streams a Part-10 file from disk without decoding
  it (``STORE_SEND_CHUNKED_DATASET``) when a context for its exact syntax was accepted;
  only when the peer refused that syntax is the file decoded and sent uncompressed.
- pynetdicom as a sender is slow with small PDUs, so we offer a large maximum PDU.
- Orthanc aborts a find/get/move from a caller missing in its DicomModalities, and answers
  0xA801 to a C-MOVE whose destination it does not know: the errors say so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, StoragePresentationContexts, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
)
from tqdm import tqdm

from compacs.service.dimse import identity

log = logging.getLogger("compacs.scu")

MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8: odd IDs 1..255)
MAX_PDU = 0  # what we offer to receive: unlimited (pynetdicom is slow with small PDUs)
DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # DICOMDIR: a file set index, not sent

UNCOMPRESSED = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
NATIVE_PAIR = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# Compressed syntaxes a study may hold, for the one-context-per-syntax C-GET proposal;
# lossless first. The syntaxes a peer cannot handle are simply not accepted by it.
GET_COMPRESSED = [
    UID("1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    UID("1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    UID("1.2.840.10008.1.2.4.201"),  # HTJ2K lossless
    UID("1.2.840.10008.1.2.5"),  # RLE lossless
    UID("1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    UID("1.2.840.10008.1.2.4.57"),  # JPEG lossless
    UID("1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
    UID("1.2.840.10008.1.2.4.91"),  # JPEG 2000
    UID("1.2.840.10008.1.2.4.50"),  # JPEG baseline
    UID("1.2.840.10008.1.2.4.51"),  # JPEG extended
]
# One context for each of the other storage classes (the peer picks one of these).
GET_COMMON_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID("1.2.840.10008.1.2.4.80"),
    UID("1.2.840.10008.1.2.4.90"),
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_RANGES = (
    (0xA700, 0xA7FF, "Out of Resources"),
    (0xA900, 0xA9FF, "Data set does not match SOP class"),
    (0xC000, 0xCFFF, "Cannot understand"),
)

# Keys shown by `compacs query` at each level when none are asked for.
DEFAULT_KEYS: dict[str, list[str]] = {
    "PATIENT": [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
    ],
    "STUDY": [
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "StudyInstanceUID",
        "SeriesNumber",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": ["SeriesInstanceUID", "InstanceNumber", "SOPClassUID", "SOPInstanceUID"],
}
FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}


class ScuError(Exception):
    """An operation could not be done at all; the message says what and what to check."""


class AddressError(ScuError, ValueError):
    """A peer address or AE title that is not well formed."""


class NoContextError(ScuError):
    """The peer accepted none of the presentation contexts we proposed."""


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network; `tls`: reached with DICOM TLS
    (dimse/tls.client_context), else plain TCP."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}" + (" (TLS)" if self.tls else "")


def check_ae_title(value: str, what: str = "AE title") -> str:
    """An AE title as DICOM allows it (1-16 printable ASCII characters, no backslash)."""
    title = value.strip()
    if not title or len(title) > 16:
        raise AddressError(f"{what} {value!r}: an AE title has 1 to 16 characters")
    if "\\" in title or not all(32 <= ord(c) < 127 for c in title):
        raise AddressError(f"{what} {value!r}: an AE title is printable ASCII without backslash")
    return title


def parse_peer(text: str, what: str = "address") -> Peer:
    """``AE@host:port`` (``AE@[::1]:104`` for IPv6) -> Peer; AddressError says what is wrong."""
    example = "write it as AE@host:port, e.g. ORTHANC@127.0.0.1:4242"
    ae, at, hostport = text.rpartition("@")
    if not at:
        raise AddressError(f"{what} {text!r}: no AE title; {example}")
    if not ae:
        raise AddressError(f"{what} {text!r}: the AE title before '@' is empty; {example}")
    ae = check_ae_title(ae, f"{what} {text!r}:")
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise AddressError(f"{what} {text!r}: IPv6 hosts are written [addr]:port")
        port = rest[1:]
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            raise AddressError(f"{what} {text!r}: no port after the host; {example}")
    if not host or any(c.isspace() for c in host):
        raise AddressError(f"{what} {text!r}: the host is empty or has spaces; {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AddressError(f"{what} {text!r}: the port must be a number from 1 to 65535")
    return Peer(ae, host, int(port))


# --------------------------------------------------------------------------- associations


def _no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: disable Nagle (a DIMSE message is several sends; see scp._no_delay)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ErrorLog(logging.Handler):
    """Keeps pynetdicom's error lines (rejection reasons...) for our own messages."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _pynetdicom_quiet() -> Iterator[_ErrorLog]:
    """Capture pynetdicom's errors instead of printing them (we report them ourselves),
    unless debug logging is on."""
    logger = logging.getLogger("pynetdicom")
    capture = _ErrorLog()
    verbose = logger.isEnabledFor(logging.DEBUG) or logging.getLogger().isEnabledFor(logging.DEBUG)
    saved = logger.level, logger.propagate
    logger.addHandler(capture)
    if not verbose:
        logger.setLevel(logging.ERROR)
        logger.propagate = False
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def _chunked(*, send: bool | None = None, recv: bool | None = None) -> Iterator[None]:
    """pynetdicom's switches for streaming datasets from/to files (process-wide, restored):
    `send`: a file path given to send_c_store is streamed undecoded; `recv`: a received
    C-STORE data set goes to a temporary Part-10 file (event.dataset_path)."""
    saved = _config.STORE_SEND_CHUNKED_DATASET, _config.STORE_RECV_CHUNKED_DATASET
    if send is not None:
        _config.STORE_SEND_CHUNKED_DATASET = send
    if recv is not None:
        _config.STORE_RECV_CHUNKED_DATASET = recv
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET, _config.STORE_RECV_CHUNKED_DATASET = saved


def _make_ae(calling_ae: str) -> AE:
    ae = AE(ae_title=check_ae_title(calling_ae, "calling AE title"))
    identity.apply(ae)
    ae.maximum_pdu_size = MAX_PDU
    ae.acse_timeout = 30
    ae.dimse_timeout = 300  # between two messages of one operation (a slow C-MOVE sub-op)
    ae.network_timeout = 300
    return ae


def associate(
    calling_ae: str,
    peer: Peer,
    contexts: Sequence[PresentationContext],
    *,
    roles: Sequence[Any] = (),
    handlers: Sequence[tuple] = (),
) -> Association:
    """An established association, or ScuError saying why not (refused, rejected...)."""
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts, at most {MAX_CONTEXTS}")
    ae = _make_ae(calling_ae)
    opened: list[bool] = []

    def on_open(event: evt.Event) -> None:
        opened.append(True)
        _no_delay(event)

    with _pynetdicom_quiet() as errors:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=list(contexts),
            ae_title=peer.ae_title,
            max_pdu=MAX_PDU,
            ext_neg=list(roles) or None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers],
            tls_args=(peer.tls, peer.host) if peer.tls else None,
        )
    if assoc.is_established:
        return assoc
    if not opened:
        tcp = [line.split(": ", 1)[-1] for line in errors.lines if "TCP" in line]
        if peer.tls and tcp and "SSL" in tcp[-1]:
            raise ScuError(
                f"TLS with {peer} failed: {tcp[-1]}: check that {peer.port} is its TLS port, "
                "that its certificate chains to --tls-ca-bundle and names the host "
                f"{peer.host!r}, and that it accepts our --tls-certificate"
            )
        raise ScuError(
            f"cannot reach {peer}: no connection to {peer.host} port {peer.port} "
            f"({tcp[-1] if tcp else 'connection refused or timed out'})"
        )
    detail = "; ".join(line for line in errors.lines if line.startswith(("Result", "Reason")))
    if assoc.is_rejected:
        raise ScuError(
            f"{peer} rejected the association ({detail or 'no reason given'}): check the "
            f"called AE title {peer.ae_title!r} and that the peer accepts the calling AE "
            f"title {ae.ae_title!r}"
        )
    if assoc.is_aborted:
        if errors.lines and any("No accepted presentation contexts" in x for x in errors.lines):
            raise NoContextError(f"{peer} accepted none of the presentation contexts we proposed")
        # With TLS 1.3 a server refuses a client certificate after our side of the
        # handshake is done: the connection then ends at our association request.
        tls_hint = (
            "; or it refused our TLS certificate (give --tls-certificate and --tls-key if it "
            "requires one)"
            if peer.tls
            else ""
        )
        raise ScuError(
            f"{peer} aborted the association request: it may not accept calls from AE "
            f"title {ae.ae_title!r} (Orthanc: add it to DicomModalities){tls_hint}"
        )
    raise ScuError(f"{peer} did not answer the association request (timed out?)")


def status_text(status: int, table: dict[int, tuple[str, str]]) -> str:
    """``0xA700 (Refused: Out of Resources)``: a status with the standard's words."""
    for candidate in (table, STORAGE_SERVICE_CLASS_STATUS):
        if status in candidate:
            return f"0x{status:04X} ({candidate[status][1]})"
    for lo, hi, words in STATUS_RANGES:
        if lo <= status <= hi:
            return f"0x{status:04X} ({words})"
    return f"0x{status:04X}"


def _status_of(rsp: Dataset) -> tuple[int | None, str]:
    """(status, error comment) of a response; status None when none came (abort, timeout)."""
    if "Status" not in rsp:
        return None, ""
    return int(rsp.Status), str(rsp.get("ErrorComment", "") or "")


def echo(calling_ae: str, peer: Peer) -> None:
    """C-ECHO; ScuError unless the peer answers Success."""
    assoc = associate(calling_ae, peer, [build_context(Verification)])
    try:
        status, _ = _status_of(assoc.send_c_echo())
    finally:
        _release(assoc)
    if status != 0x0000:
        raise ScuError(f"{peer} did not answer C-ECHO with Success (status {status})")


def _release(assoc: Association) -> None:
    if assoc.is_established:
        with _pynetdicom_quiet():
            assoc.release()


def _write(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


def _bar(total: int | None, desc: str, unit: str) -> tqdm:
    """A progress bar on stderr, shown only on a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


# --------------------------------------------------------------------------- C-STORE


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


def _accepted(assoc: Association) -> set[tuple[str, str]]:
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}


def store_file(assoc: Association, f: DicomFile, accepted: set[tuple[str, str]]) -> StoreResult:
    """C-STORE one file: streamed unchanged when its syntax was accepted, else decoded to
    explicit VR LE (when that, or implicit VR LE, was accepted)."""
    if (f.sop_class, f.transfer_syntax) in accepted:
        with _chunked(send=True):
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
    status, comment = _status_of(rsp)
    if status is None:
        return StoreResult(f.path, None, "no response (association aborted or timed out)")
    message = "; ".join(x for x in (note, comment) if x)
    return StoreResult(f.path, status, message)


def send_files(paths: Iterable[Path | str], peer: Peer, calling_ae: str) -> SendReport:
    """C-STORE the DICOM files under `paths` to `peer`; per-file results in the report."""
    files, skipped = collect_files(paths)
    report = SendReport(skipped=skipped)
    for path, why in skipped:
        _write(f"skipped {path}: {why}")
    if not files:
        return report
    bar = _bar(len(files), "send", "file")
    try:
        for contexts, group in plan_associations(files):
            assoc = associate(calling_ae, peer, contexts)
            report.associations += 1
            accepted = _accepted(assoc)
            try:
                for f in group:
                    if not assoc.is_established:
                        result = StoreResult(f.path, None, "association lost")
                    else:
                        result = store_file(assoc, f, accepted)
                    report.results.append(result)
                    if not result.ok and not bar.disable:  # the caller lists them at the end
                        _write(f"FAILED {f.path}: {result.describe()}")
                    elif result.message:
                        _write(f"{f.path}: {result.message}")
                    bar.update(1)
            finally:
                _release(assoc)
    finally:
        bar.close()
    return report


# --------------------------------------------------------------------------- C-FIND


def parse_key(item: str) -> tuple[str, str | None]:
    """``Keyword=value`` / ``Keyword`` / ``(0010,0010)=value`` -> (keyword, value or None)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    hexdigits = key.strip("()").replace(",", "")
    if len(hexdigits) == 8 and all(c in "0123456789abcdefABCDEF" for c in hexdigits):
        keyword = keyword_for_tag(int(hexdigits, 16))
        if not keyword:
            raise ScuError(f"-k {item!r}: tag {key} is not in the DICOM dictionary")
        key = keyword
    if tag_for_keyword(key) is None:
        raise ScuError(f"-k {item!r}: {key!r} is not a DICOM keyword (e.g. PatientName=DOE*)")
    if dictionary_VR(key) == "SQ":
        raise ScuError(f"-k {item!r}: sequence attributes cannot be queried with -k")
    return key, (value if sep else None)


def build_identifier(level: str, keys: Sequence[tuple[str, str | None]]) -> Dataset:
    """A C-FIND identifier: the level, each key with its matching value (empty: return it)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    with warnings.catch_warnings():  # ranges and wildcards are not valid attribute values
        warnings.simplefilter("ignore")
        for keyword, value in keys:
            vr = dictionary_VR(keyword)
            if value in (None, ""):
                ds.add_new(tag_for_keyword(keyword), vr, None)
            elif vr in ("US", "UL", "SS", "SL", "SV", "UV", "FL", "FD"):
                try:
                    number = float(value) if vr in ("FL", "FD") else int(value)
                except ValueError as exc:
                    raise ScuError(f"{keyword}={value!r}: {vr} takes a number") from exc
                ds.add_new(tag_for_keyword(keyword), vr, number)
            else:
                ds.add_new(tag_for_keyword(keyword), vr, value)
    return ds


def _abort_hint(peer: Peer, calling_ae: str, what: str) -> str:
    return (
        f"{peer} ended the association during the {what} without answering: it may not "
        f"accept {what} requests from AE title {calling_ae!r} (Orthanc answers only callers "
        "in its DicomModalities)"
    )


def find(
    peer: Peer,
    calling_ae: str,
    level: str,
    keys: Sequence[tuple[str, str | None]],
    model: str = "study",
) -> list[Dataset]:
    """C-FIND at `peer`; the answers' identifiers. ScuError on failure statuses."""
    model_uid = FIND_MODELS[model]
    identifier = build_identifier(level, keys)
    assoc = associate(calling_ae, peer, [build_context(model_uid, NATIVE_PAIR)])
    answers: list[Dataset] = []
    try:
        for rsp, ident in assoc.send_c_find(identifier, model_uid):
            status, comment = _status_of(rsp)
            if status is None:
                raise ScuError(_abort_hint(peer, calling_ae, "C-FIND"))
            if status in (0xFF00, 0xFF01):
                if ident is not None:
                    answers.append(ident)
            elif status != 0x0000:
                raise ScuError(
                    f"{peer} answered the C-FIND with "
                    f"{status_text(status, QR_FIND_SERVICE_CLASS_STATUS)}"
                    + (f": {comment}" if comment else "")
                )
    finally:
        _release(assoc)
    return answers


def answer_value(ds: Dataset, keyword: str) -> Any:
    """An answer's value for JSON: str, list of str (multi-valued), or None when absent."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\0 ")
    return str(value)


# --------------------------------------------------------------------------- C-MOVE / C-GET


@dataclass
class PullReport:
    study_uid: str
    via: str
    completed: int = 0
    failed: int = 0
    warning: int = 0
    final_status: int | None = None
    expected: int | None = None  # NumberOfStudyRelatedInstances from the remote, if told
    forward_failures: list[str] = field(default_factory=list)  # C-GET: instance: why
    final_comment: str = ""  # Error Comment of a failed final response

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and not self.forward_failures
            and self.final_status in (0x0000, 0xB000)
            and (self.final_status == 0x0000 or self.warning > 0)
        )


def study_info(peer: Peer, calling_ae: str, study_uid: str) -> tuple[int | None, list[str]]:
    """(number of instances, SOP classes) of the study at `peer`, ScuError if it has none.

    Peers that do not offer C-FIND, or do not fill these keys, give (None, [])."""
    keys = [
        ("StudyInstanceUID", study_uid),
        ("NumberOfStudyRelatedInstances", None),
        ("SOPClassesInStudy", None),
    ]
    try:
        answers = find(peer, calling_ae, "STUDY", keys)
    except NoContextError:
        return None, []
    if not answers:
        raise ScuError(f"{peer} has no study with Study Instance UID {study_uid}")
    counts: list[int] = []
    classes: list[str] = []
    for ds in answers:  # one per patient, should the remote key studies by patient
        count = answer_value(ds, "NumberOfStudyRelatedInstances")
        if isinstance(count, str) and count.strip().isdigit():
            counts.append(int(count))
        uids = answer_value(ds, "SOPClassesInStudy") or []
        classes += [uids] if isinstance(uids, str) else uids
    total = sum(counts) if len(counts) == len(answers) else None
    return total, list(dict.fromkeys(uid for uid in classes if uid))


def get_contexts(study_classes: Sequence[str]) -> tuple[list[PresentationContext], list]:
    """Storage contexts (and SCP role selections) for a C-GET, with the Get context first.

    The study's SOP classes (from C-FIND, when the peer told) get one context per syntax,
    so that compressed objects come as they are stored; the other storage classes of
    pynetdicom's list fill the rest, one context each with several syntaxes."""
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet, NATIVE_PAIR)]
    budget = MAX_CONTEXTS - len(contexts)
    per_class: list[list[UID]] = [NATIVE_PAIR, *([ts] for ts in GET_COMPRESSED)]
    if len(study_classes) * len(per_class) > budget:
        per_class = [NATIVE_PAIR, [GET_COMPRESSED[0]], [GET_COMPRESSED[1]]]
    if len(study_classes) * len(per_class) > budget:
        per_class = [GET_COMMON_SYNTAXES]
    classes = list(dict.fromkeys(study_classes))[: budget // len(per_class)]
    for uid in classes:
        contexts.extend(build_context(uid, syntaxes) for syntaxes in per_class)
    for cx in StoragePresentationContexts:
        if len(contexts) >= MAX_CONTEXTS:
            break
        if cx.abstract_syntax not in classes:
            contexts.append(build_context(cx.abstract_syntax, GET_COMMON_SYNTAXES))
            classes.append(cx.abstract_syntax)
    roles = [build_role(uid, scp_role=True) for uid in classes]
    return contexts, roles


class Forwarder:
    """C-STOREs received files to one peer as they come, on one association that is opened
    again with more contexts when an object of a new (SOP class, syntax) pair arrives."""

    def __init__(self, calling_ae: str, peer: Peer) -> None:
        self.calling_ae = calling_ae
        self.peer = peer
        self.pairs: dict[tuple[str, str], None] = {}
        self.assoc: Association | None = None
        self.accepted: set[tuple[str, str]] = set()
        self.associations = 0

    def _open(self) -> None:
        self.close()
        syntaxes: dict[str, set[str]] = defaultdict(set)
        for sop_class, ts in self.pairs:
            syntaxes[sop_class].add(ts)
        contexts: list[PresentationContext] = []
        for sop_class in reversed(list(syntaxes)):  # the newest first, should it overflow
            more = class_contexts(sop_class, syntaxes[sop_class])
            if len(contexts) + len(more) > MAX_CONTEXTS:
                break
            contexts.extend(more)
        self.assoc = associate(self.calling_ae, self.peer, contexts)
        self.accepted = _accepted(self.assoc)
        self.associations += 1

    def forward(self, path: Path, sop_class: str, sop_instance: str, ts: str) -> StoreResult:
        f = DicomFile(path, UID(sop_class), sop_instance, UID(ts))
        pair = (str(sop_class), str(ts))
        if pair not in self.pairs or self.assoc is None or not self.assoc.is_established:
            self.pairs[pair] = None
            self._open()
        assert self.assoc is not None
        return store_file(self.assoc, f, self.accepted)

    def close(self) -> None:
        if self.assoc is not None:
            _release(self.assoc)
            self.assoc = None


def _counts(rsp: Dataset) -> tuple[int | None, int | None, int | None, int | None]:
    def get(kw: str) -> int | None:
        value = rsp.get(kw)
        return int(value) if value not in (None, "") else None

    return (
        get("NumberOfRemainingSuboperations"),
        get("NumberOfCompletedSuboperations"),
        get("NumberOfFailedSuboperations"),
        get("NumberOfWarningSuboperations"),
    )


def _follow(
    responses: Iterable[tuple[Dataset, Dataset | None]],
    report: PullReport,
    peer: Peer,
    calling_ae: str,
    what: str,
    table: dict[int, tuple[str, str]],
    bar: tqdm,
) -> None:
    """Track a C-MOVE/C-GET's responses: progress from pending ones, counts from the last."""
    last: tuple[int | None, int, int, int] | None = None
    for rsp, _ident in responses:
        status, comment = _status_of(rsp)
        if status is None and last is None:
            raise ScuError(_abort_hint(peer, calling_ae, what))
        if status is None:
            raise ScuError(
                f"{peer} ended the association in the middle of the {what} "
                f"({last[1]} sub-operation(s) completed, {last[2]} failed)"
            )
        remaining, completed, failed, warning = _counts(rsp)
        done = [v or 0 for v in (completed, failed, warning)]
        if remaining is not None:
            bar.total = remaining + sum(done)
        bar.n = sum(done)
        bar.refresh()
        if status in (0xFF00, 0xFF01):
            last = (remaining, *done)
            continue
        report.final_status = status
        if completed is None and failed is None and warning is None:
            # no counts in the final response: what the last pending one said, plus what
            # remained (done if the operation succeeded, failed otherwise)
            rest, completed_, failed_, warning_ = last or (0, 0, 0, 0)
            report.completed = completed_ + ((rest or 0) if status == 0x0000 else 0)
            report.failed = failed_ + (0 if status == 0x0000 else (rest or 0))
            report.warning = warning_
        else:
            report.completed, report.failed, report.warning = done
        if status not in (0x0000, 0xB000):
            report.final_comment = comment
            words = status_text(status, table)
            _write(f"{peer} ended the {what} with {words}" + (f": {comment}" if comment else ""))


def pull_move(
    peer: Peer, calling_ae: str, study_uid: str, into: Peer, expected: int | None = None
) -> PullReport:
    """C-MOVE the study from `peer` to `into` (the remote must know `into`'s AE title)."""
    report = PullReport(study_uid, "move", expected=expected)
    identifier = build_identifier("STUDY", [("StudyInstanceUID", study_uid)])
    contexts = [build_context(StudyRootQueryRetrieveInformationModelMove, NATIVE_PAIR)]
    assoc = associate(calling_ae, peer, contexts)
    bar = _bar(expected, "pull", "img")
    try:
        responses = assoc.send_c_move(
            identifier, into.ae_title, StudyRootQueryRetrieveInformationModelMove
        )
        _follow(responses, report, peer, calling_ae, "C-MOVE", QR_MOVE_SERVICE_CLASS_STATUS, bar)
    finally:
        bar.close()
        _release(assoc)
    status = report.final_status or 0
    nothing_done = report.completed + report.failed + report.warning == 0
    if status == STATUS_MOVE_DESTINATION_UNKNOWN or (0xC000 <= status <= 0xCFFF and nothing_done):
        words = status_text(status, QR_MOVE_SERVICE_CLASS_STATUS)
        comment = f": {report.final_comment}" if report.final_comment else ""
        guess = "does not know" if status == STATUS_MOVE_DESTINATION_UNKNOWN else "may not know"
        raise ScuError(
            f"{peer} refused the C-MOVE with {words}{comment}. It {guess} the move "
            f"destination {into.ae_title!r}: add that AE title with its host and port to the "
            "remote's DICOM peers (Orthanc: DicomModalities, or PUT /modalities/NAME "
            '{"AET": .., "Host": .., "Port": ..})'
        )
    return report


def pull_get(
    peer: Peer,
    calling_ae: str,
    study_uid: str,
    into: Peer,
    expected: int | None = None,
    study_classes: Sequence[str] = (),
) -> PullReport:
    """C-GET the study from `peer`, C-STOREing each object to `into` as it arrives (one
    object at a time on disk, none kept)."""
    report = PullReport(study_uid, "get", expected=expected)
    forwarder = Forwarder(calling_ae, into)

    def on_store(event: evt.Event) -> int:
        request = event.request
        path = Path(event.dataset_path)
        try:
            result = forwarder.forward(
                path,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
            )
        except ScuError as exc:
            result = StoreResult(path, None, str(exc))
        finally:
            handle = getattr(request, "_dataset_file", None)
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        if not result.ok:
            line = f"{request.AffectedSOPInstanceUID}: {result.describe()}"
            report.forward_failures.append(line)
            if not bar.disable:  # the caller lists them at the end
                _write(f"FAILED to store in {into}: {line}")
            return result.status if result.status is not None else STATUS_OUT_OF_RESOURCES
        return result.status or 0x0000

    contexts, roles = get_contexts(study_classes)
    identifier = build_identifier("STUDY", [("StudyInstanceUID", study_uid)])
    bar = _bar(expected, "pull", "img")
    with _chunked(send=True, recv=True):
        assoc = associate(
            calling_ae, peer, contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]
        )
        try:
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            _follow(responses, report, peer, calling_ae, "C-GET", QR_GET_SERVICE_CLASS_STATUS, bar)
        finally:
            bar.close()
            _release(assoc)
            forwarder.close()
    return report


def pull(peer: Peer, calling_ae: str, study_uid: str, into: Peer, via: str = "move") -> PullReport:
    """Import a study from `peer` into `into` by C-MOVE or C-GET (+ C-STORE forwarding)."""
    try:
        echo(calling_ae, into)
    except ScuError as exc:
        raise ScuError(f"the destination {into} does not answer ({exc}): is it running?") from exc
    expected, classes = study_info(peer, calling_ae, study_uid)
    if via == "move":
        return pull_move(peer, calling_ae, study_uid, into, expected)
    if via == "get":
        return pull_get(peer, calling_ae, study_uid, into, expected, classes)
    raise ValueError(f"via must be 'move' or 'get', not {via!r}")
