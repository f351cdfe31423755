"""Where a C-GET or C-MOVE is answered: pick the instances, and give each one in a syntax the
peer accepted (invariant 4).

The stored bytes pass through when the peer accepted the stored syntax; otherwise the
object is decoded and, if the peer accepted one, re-encoded into a compressed syntax
(verified like any encode). Private syntaxes never leave the node. Instances are read,
transcoded and handed to pynetdicom one at a time, so memory does not grow with the size
of the study.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context

from compacs.codecs import registry
from compacs.service import wire
from compacs.service.dimse import bulk_store
from compacs.service.dimse.bulk_store import bulk_stores
from compacs.service.dimse.polling import fast_polling, poll_fast
from compacs.service.query import UNIQUE_KEYS
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Index, Instance
from compacs.service.transcode import NATIVE_SYNTAXES, TranscodeError, transcode_dataset

log = logging.getLogger("compacs.retrieve")

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_UNKNOWN_DESTINATION = 0xA801
STATUS_IDENTIFIER_MISMATCH = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000
# Instances read and decoded ahead of the one being sent (memory holds READ_AHEAD + 1).
READ_AHEAD = 1
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255

LEVEL_KEYS = UNIQUE_KEYS  # a retrieve names its instances by the unique keys of each level


class RetrieveError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_private(ts: str) -> bool:
    """Our own syntaxes (2.25 UIDs) are for the archive only: never sent."""
    return not ts.startswith("1.2.840.10008.")


def candidate_syntaxes(inst: Instance) -> list[str]:
    """Syntaxes we can give `inst` in, best first: as stored, as received (if we can make
    it), then lossless re-encodings and the uncompressed ones every peer reads."""
    order = [
        inst.stored_transfer_syntax,
        inst.received_transfer_syntax,
        JPEG_LS,
        J2K_LOSSLESS,
        EXPLICIT_LE,
        IMPLICIT_LE,
    ]
    seen: list[str] = []
    for ts in order:
        if ts and ts not in seen and not is_private(ts) and _producible(ts, inst):
            seen.append(ts)
    return seen


def _producible(ts: str, inst: Instance) -> bool:
    """The stored bytes are in `ts`, or it is native, or an available lossless encoder makes
    it from the decoded pixels (transcode's rules). The syntax an object arrived in is not
    enough: JPEG Lossless (.4.70) arrives, no encoder makes it."""
    if ts == inst.stored_transfer_syntax or ts in NATIVE_SYNTAXES:
        return True
    codec = registry.by_transfer_syntax(ts)
    return codec is not None and codec.lossless and codec.is_available()


def choose_syntax(inst: Instance, accepted: list[str]) -> str | None:
    """The syntax to send `inst` in, given the peer's accepted syntaxes for its SOP class
    (in the peer's order of preference); None if there is none we can produce."""
    if inst.stored_transfer_syntax in accepted:
        return inst.stored_transfer_syntax  # pass the stored bytes through
    candidates = candidate_syntaxes(inst)
    for ts in accepted:
        if ts in candidates:
            return ts
    return None


def matching_instances(index: Index, identifier: Dataset) -> list[Instance]:
    """The instances a C-GET/C-MOVE identifier names by its level's unique keys."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVEL_KEYS:
        raise RetrieveError(
            STATUS_IDENTIFIER_MISMATCH,
            f"QueryRetrieveLevel {level!r}: must be one of {', '.join(LEVEL_KEYS)}",
        )
    filters: dict[str, list[str]] = {}
    for lvl, keyword in LEVEL_KEYS.items():
        value = identifier.get(keyword)
        if value not in (None, ""):
            values = value if isinstance(value, MultiValue) else [value]
            filters[keyword] = [str(v).strip() for v in values if str(v).strip()]
        if lvl == level:
            break
    if LEVEL_KEYS[level] not in filters:
        raise RetrieveError(
            STATUS_IDENTIFIER_MISMATCH,
            f"a {level} retrieve needs {LEVEL_KEYS[level]} in the identifier",
        )
    return index.instances_where(
        patient_ids=filters.get("PatientID"),
        study_uids=filters.get("StudyInstanceUID"),
        series_uids=filters.get("SeriesInstanceUID"),
        sop_uids=filters.get("SOPInstanceUID"),
    )


def failed_suboperation(inst: Instance) -> Dataset:
    """A dataset pynetdicom cannot send (no context has this syntax): it counts the
    sub-operation as failed and lists the SOP Instance UID, as PS3.4 C.4.2.3.1 asks."""
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_instance_uid
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.999")  # no peer accepts it
    return ds


def prepare(archive: Archive, inst: Instance, accepted: list[str]) -> Dataset:
    """Read one instance and give it in the best syntax the peer accepted: as a
    wire.WireInstance (stored bytes, maybe with decoded pixels spliced in) where that is
    safe, else as a transcoded Dataset."""
    target = choose_syntax(inst, accepted)
    if target is None:
        raise TranscodeError(f"the peer accepted none of {candidate_syntaxes(inst)}")
    blob = archive.read(inst.blob_path, inst.checksum)
    if target == inst.stored_transfer_syntax:
        return wire.as_stored(blob, inst.sop_class_uid, inst.sop_instance_uid, target)
    if target == EXPLICIT_LE:
        spliced = wire.decoded_explicit_le(blob)
        if spliced is not None:
            return spliced
    return transcode_dataset(dcmread(BytesIO(blob)), target)


def accepted_for(contexts: list[PresentationContext], sop_class: str, role: str) -> list[str]:
    """Accepted syntaxes for `sop_class` in which we may send (role 'scu'), peer's order first."""
    found = []
    for cx in sorted(contexts, key=lambda c: c.context_id or 0):
        if cx.abstract_syntax == sop_class and getattr(cx, f"as_{role}"):
            found.extend(str(ts) for ts in cx.transfer_syntax)
    return found


@dataclass
class SubAssociation:
    """Filled by the sub-association's EVT_ACCEPTED, so the C-MOVE generator can see which
    syntaxes the move destination accepted."""

    assoc: Any = None
    contexts: list[PresentationContext] = field(default_factory=list)

    def on_accepted(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        poll_fast(event.assoc)  # lives only for this C-MOVE
        bulk_store.enable(event.assoc)
        self.contexts = list(event.assoc.accepted_contexts)


def move_contexts(instances: list[Instance]) -> list[PresentationContext]:
    """One context per (SOP class, syntax): peers such as Orthanc pick uncompressed when one
    context offers several syntaxes. Trimmed to 128 by dropping the least wanted first."""
    wanted: list[tuple[str, str]] = []
    for inst in instances:
        for ts in candidate_syntaxes(inst):
            if (inst.sop_class_uid, ts) not in wanted:
                wanted.append((inst.sop_class_uid, ts))
    if len(wanted) > MAX_CONTEXTS:  # keep as-stored and explicit VR LE for every class
        essential = [w for w in wanted if w[1] == EXPLICIT_LE] + [
            w for w in wanted if w[1] != EXPLICIT_LE
        ]
        wanted = essential[:MAX_CONTEXTS]
    return [build_context(sop, ts) for sop, ts in wanted]


def suboperations(
    archive: Archive,
    instances: list[Instance],
    event: evt.Event,
    accepted: Callable[[str], list[str]],
) -> Iterator[tuple[int, Dataset | None]]:
    """The (status, dataset) pairs of a C-GET/C-MOVE.

    The next instance is read and decoded in a helper thread while pynetdicom sends the
    current one (CharLS via imagecodecs releases the GIL), so at most two are in memory.
    """
    calling = event.assoc.requestor.ae_title

    def load(inst: Instance) -> Dataset:
        try:
            return prepare(archive, inst, accepted(inst.sop_class_uid))
        except Exception as exc:  # damaged blob, no common syntax, decode failure
            log.error("retrieve of SOP %s for %s failed: %s", inst.sop_instance_uid, calling, exc)
            return failed_suboperation(inst)

    with (
        fast_polling(event.assoc),
        bulk_stores(event.assoc),
        ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="retrieve") as loader,
    ):
        upcoming = deque(loader.submit(load, inst) for inst in instances[:READ_AHEAD])
        for i in range(len(instances)):
            ds = upcoming.popleft().result()
            if i + READ_AHEAD < len(instances):
                upcoming.append(loader.submit(load, instances[i + READ_AHEAD]))
            if event.is_cancelled:
                log.info("retrieve cancelled by %s", calling)
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, ds
