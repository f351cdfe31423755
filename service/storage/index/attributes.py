"""What the index keeps of a data set: its attributes read as column values, trimmed to the
columns' sizes, a missing or empty one as NULL. Ingest's writes and the patient backfill read
a data set through these, so a study answers alike whichever of them wrote it."""

from __future__ import annotations

from typing import Any

from pydicom.multival import MultiValue


def _text(ds: Any, keyword: str, limit: int | None = None) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).strip().replace("\x00", "")
    return text[:limit] if limit else text


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def _uid(ds: Any, keyword: str) -> str:
    """A UID as the index keys it: validate.inspect has made sure it is there."""
    return str(ds.get(keyword)).rstrip("\0 ")


def _joined(ds: Any, keyword: str) -> str | None:
    """A multi-valued text attribute as DICOM writes it (backslash-joined)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    text = "\\".join(str(v).strip().replace("\x00", "") for v in items)
    return text or None


def _instance_values(ds: Any) -> dict[str, Any]:
    """The instance columns read from the data set (ingest names the SOP class when the data
    set lacks one: the request's)."""
    return {
        "sop_instance_uid": _uid(ds, "SOPInstanceUID"),
        **({"sop_class_uid": _uid(ds, "SOPClassUID")} if ds.get("SOPClassUID") else {}),
        "instance_number": _int(ds, "InstanceNumber"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "bits_stored": _int(ds, "BitsStored"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
    }


def _patient_values(ds: Any) -> dict[str, Any]:
    """The patient attributes of an object, as the index keeps them."""
    return {
        "patient_id": _text(ds, "PatientID", 64) or "",
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
        "patient_name": _text(ds, "PatientName"),
        "patient_birth_date": _text(ds, "PatientBirthDate", 8),
        "patient_sex": _text(ds, "PatientSex", 16),
        "other_patient_ids": _joined(ds, "OtherPatientIDs"),
    }


def _study_patient_values(patient: dict[str, Any]) -> dict[str, Any]:
    """The study's own copy of its patient attributes (PatientID lives on the patient row:
    every study of a row has the same)."""
    return {k: v for k, v in patient.items() if k != "patient_id"}
