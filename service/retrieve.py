"""What a C-GET or C-MOVE retrieves: the instances it names, and each one made ready in a
syntax the peer accepted (invariant 4). The sub-operations themselves, on the wire, are
dimse/suboperations.py's.

The stored bytes pass through when the peer accepted the stored syntax; otherwise the
object is decoded and, if the peer accepted one, re-encoded into a compressed syntax
(verified like any encode). Private syntaxes never leave the node. Instances are read,
transcoded and handed to pynetdicom one at a time, so memory does not grow with the size
of the study; a big one (wire.STREAM_ABOVE) is sent from its open blob file, frame by
frame, where wire.streamed can (with the fast paths), so that memory does not grow with
the size of the object either. What prepare gives is protocol-free (wire.EncodedParts, or
a Dataset): dimse/ wraps it for pynetdicom, and a web face can stream the same value.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue

from compacs.service import wire
from compacs.service.key_matching import STATUS_IDENTIFIER_MISMATCH, uid_values
from compacs.service.query import UNIQUE_KEYS
from compacs.service.storage.index import Index, Instance
from compacs.service.syntaxes import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    J2K_LOSSLESS,
    JPEG_LS,
    is_private,
    producible,
)
from compacs.service.transcode import TranscodeError, transcode_dataset

LEVEL_KEYS = UNIQUE_KEYS  # a retrieve names its instances by the unique keys of each level


class RetrieveError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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
        if (
            ts
            and ts not in seen
            and not is_private(ts)
            and producible(ts, inst.stored_transfer_syntax)
        ):
            seen.append(ts)
    return seen


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
            if keyword == "PatientID":  # LO: a list of IDs, matched exactly too
                values = value if isinstance(value, MultiValue) else [value]
                filters[keyword] = [str(v).strip() for v in values if str(v).strip()]
            elif uids := uid_values(value):  # a UI key: as C-FIND reads it, no wildcards
                filters[keyword] = uids
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


# The archive service's open_instance: a big instance's blob, open and checked, with the
# offset and length of the instance in it; None for one to read whole.
OpenBlob = Callable[[Instance], "tuple[BinaryIO, int, int] | None"]


def prepare(
    read: Callable[[Instance], bytes],
    inst: Instance,
    accepted: list[str],
    fast: bool = True,
    open_blob: OpenBlob | None = None,
) -> wire.EncodedParts | Dataset:
    """Read one instance (`read`: the archive service's) and give it in the best syntax
    the peer accepted: with `fast`, as wire.EncodedParts (stored bytes, maybe with decoded
    pixels spliced in) where that is safe, else as a transcoded Dataset. A big instance
    that `open_blob` opens is streamed from its file where wire.stream_stored can."""
    target = choose_syntax(inst, accepted)
    if target is None:
        raise TranscodeError(f"the peer accepted none of {candidate_syntaxes(inst)}")
    if fast and open_blob is not None:
        streaming = wire.stream_stored(open_blob, inst, target)
        if streaming is not None:
            return streaming
    blob = read(inst)
    if not fast:
        return transcode_dataset(dcmread(BytesIO(blob)), target)
    if target == inst.stored_transfer_syntax:
        return wire.as_stored(blob, inst.sop_class_uid, inst.sop_instance_uid, target)
    if target == EXPLICIT_LE:
        spliced = wire.decoded_explicit_le(blob)
        if spliced is not None:
            return spliced
    return transcode_dataset(dcmread(BytesIO(blob)), target)
