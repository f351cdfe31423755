"""C-FIND at a peer (`compacs query`, and the study look-up before a pull): query keys as
a user writes them, the identifier, and the answers' values as plain Python."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pynetdicom import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

from compacs.service.dimse.scu.associations import NATIVE_PAIR, associate, release
from compacs.service.dimse.scu.errors import ScuError, abort_hint, status_of, status_text
from compacs.service.dimse.scu.peers import Peer

FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}


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
            status, comment = status_of(rsp)
            if status is None:
                raise ScuError(abort_hint(peer, calling_ae, "C-FIND"))
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
        release(assoc)
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
