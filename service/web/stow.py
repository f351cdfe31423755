"""STOW-RS (PS3.18 10.5): each application/dicom part through the ingest C-STORE uses, so
an instance is in the answer's ReferencedSOPSequence only once it is durable and indexed.

Answer (PS3.18 10.5.3): 200 when every instance was stored, 202 when some were and some
failed (or stored with a warning), 409 when none was; FailureReason carries the C-STORE
status ingest gave (0xA700 out of resources, 0xA900 does not match, 0xC000 cannot
understand, 0x0110 processing failure, 0x0124 not authorised).
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset
from pydicom.sequence import Sequence

from compacs.service.web import dicomjson, multipart
from compacs.service.web.domain import STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS, Domain

DICOM = "application/dicom"


class UnsupportedMedia(ValueError):
    """The request is not multipart/related of application/dicom parts (415)."""


def store(
    domain: Domain,
    content_type: str,
    body: bytes,
    caller: str,
    base: str,
    study: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, DICOM JSON response) of one STOW-RS request."""
    main = content_type.split(";")[0].strip().lower()
    if main != "multipart/related":
        raise UnsupportedMedia(
            f"Content-Type {main or '(none)'}: send multipart/related; "
            'type="application/dicom" (JSON and XML metadata with bulk data are not taken)'
        )
    parts = multipart.decode(body, multipart.boundary_of(content_type))
    stored, failed = Sequence(), Sequence()
    warned = False
    for part in parts:
        kind = part.content_type.split(";")[0].strip().lower()
        if kind and kind != DICOM:
            failed.append(_item("", "", STATUS_CANNOT_UNDERSTAND))
            continue
        got = domain.receive(part.body, caller, study)
        if got.status == STATUS_SUCCESS or got.status >> 12 == 0xB:
            item = _item(got.sop_class, got.sop_instance, None)
            item.RetrieveURL = (
                f"{base}/studies/{got.study}/series/{got.series}/instances/{got.sop_instance}"
            )
            if got.status != STATUS_SUCCESS:
                item.WarningReason = got.status
                warned = True
            stored.append(item)
        else:
            failed.append(_item(got.sop_class, got.sop_instance, got.status))
    answer = Dataset()
    if study is not None:
        answer.RetrieveURL = f"{base}/studies/{study}"
    answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    if not parts or not stored:
        code = 409
    elif failed or warned:
        code = 202
    else:
        code = 200
    return code, dicomjson.to_json(answer)


def _item(sop_class: str, sop_inst: str, reason: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or None
    item.ReferencedSOPInstanceUID = sop_inst or None
    if reason is not None:
        item.FailureReason = reason
    return item
