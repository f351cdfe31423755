"""What went wrong with a peer, in words a user can act on: the SCU's exceptions, DIMSE
statuses with the standard's names, and the hint for a peer that hangs up without answering
(Orthanc does so to callers missing from its DicomModalities)."""

from __future__ import annotations

from pydicom import Dataset
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_RANGES = (
    (0xA700, 0xA7FF, "Out of Resources"),
    (0xA900, 0xA9FF, "Data set does not match SOP class"),
    (0xC000, 0xCFFF, "Cannot understand"),
)


class ScuError(Exception):
    """An operation could not be done at all; the message says what and what to check."""


class AddressError(ScuError, ValueError):
    """A peer address or AE title that is not well formed."""


class NoContextError(ScuError):
    """The peer accepted none of the presentation contexts we proposed."""


def status_text(status: int, table: dict[int, tuple[str, str]]) -> str:
    """``0xA700 (Refused: Out of Resources)``: a status with the standard's words."""
    for candidate in (table, STORAGE_SERVICE_CLASS_STATUS):
        if status in candidate:
            return f"0x{status:04X} ({candidate[status][1]})"
    for lo, hi, words in STATUS_RANGES:
        if lo <= status <= hi:
            return f"0x{status:04X} ({words})"
    return f"0x{status:04X}"


def status_of(rsp: Dataset) -> tuple[int | None, str]:
    """(status, error comment) of a response; status None when none came (abort, timeout)."""
    if "Status" not in rsp:
        return None, ""
    return int(rsp.Status), str(rsp.get("ErrorComment", "") or "")


def abort_hint(peer: object, calling_ae: str, what: str) -> str:
    return (
        f"{peer} ended the association during the {what} without answering: it may not "
        f"accept {what} requests from AE title {calling_ae!r} (Orthanc answers only callers "
        "in its DicomModalities)"
    )
