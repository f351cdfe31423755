"""QIDO-RS (PS3.18 10.6): a search's query parameters made into the C-FIND identifier it
means, matched by the C-FIND code path (domain.find), answered as DICOM JSON.

- `{attribute}={value}` by keyword or tag ("PatientID", "00100020"); wildcards, date and
  time ranges and `""` as C-FIND reads them; UID lists separated by commas or backslashes.
- `includefield` (repeated or comma separated; `all`): more return keys. `all` adds the
  keys the index holds.
- `fuzzymatching=true`: person names also match as prefixes of each given value ("smi"
  finds "SMITH^JOHN"); they always match without regard to case.
- `limit`/`offset`: a page of the matches (index order); a Warning header says when more
  matches follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from compacs.service.web import dicomjson

LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}

# Return keys of each level (PS3.18 Table 10.6.3-3, -4, -5), those the index holds or
# computes; the keys of upper levels join when the search is not scoped under them.
STUDY_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
    "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)  # fmt: skip
SERIES_KEYS = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
    "NumberOfSeriesRelatedInstances", "BodyPartExamined",
)  # fmt: skip
INSTANCE_KEYS = (
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber", "Rows",
    "Columns", "BitsStored", "NumberOfFrames",
)  # fmt: skip
ALL_EXTRA = ("IssuerOfPatientID", "OtherPatientIDs", "SOPClassesInStudy")
# includefield=all: every key the index holds at the level and the levels above it
_ALL = {
    "STUDY": [*STUDY_KEYS, *ALL_EXTRA],
    "SERIES": [*STUDY_KEYS, *ALL_EXTRA, *SERIES_KEYS],
    "IMAGE": [*STUDY_KEYS, *ALL_EXTRA, *SERIES_KEYS, *INSTANCE_KEYS],
}
MAX_LIMIT = 10000


class SearchError(ValueError):
    """A query parameter that names nothing or holds a value that cannot be used (400)."""


def identifier(
    level_path: str,
    params: Iterable[tuple[str, str]],
    study: str | None = None,
    series: str | None = None,
) -> tuple[Dataset, int, int]:
    """The C-FIND identifier of a search, and its offset and limit (0: no limit)."""
    level = LEVELS[level_path]
    keys = list(INSTANCE_KEYS if level == "IMAGE" else SERIES_KEYS if level == "SERIES" else ())
    if level == "STUDY" or study is None:
        keys = list(STUDY_KEYS) + keys
    if level == "IMAGE" and series is None:
        keys += list(SERIES_KEYS)
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    offset = limit = 0
    fuzzy = False
    matching: list[tuple[str, str]] = []
    for name, value in params:
        if name == "limit":
            limit = _count(name, value, MAX_LIMIT)
        elif name == "offset":
            offset = _count(name, value, 1 << 31)
        elif name == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
        elif name == "includefield":
            for field in value.split(","):
                field = field.strip()
                if field == "all":
                    keys += _ALL[level]
                elif field:
                    keys.append(_keyword(field, "includefield"))
        else:
            matching.append((_keyword(name, "a matching key"), value))
    for keyword in dict.fromkeys(keys):
        vr = dictionary_VR(keyword)
        ds.add_new(tag_for_keyword(keyword), vr, [] if vr == "SQ" else None)
    for keyword, value in matching:
        _set(ds, keyword, value, fuzzy)
    if study is not None:
        ds.StudyInstanceUID = study
    if series is not None:
        ds.SeriesInstanceUID = series
    return ds, offset, limit


def _keyword(name: str, what: str) -> str:
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword:
        raise SearchError(
            f"{what} {name!r}: not a DICOM attribute keyword or 8-digit tag "
            "(e.g. PatientID or 00100020)"
        )
    if "." in name:
        raise SearchError(f"{what} {name!r}: sequence paths are not searchable here")
    return keyword


def _set(ds: Dataset, keyword: str, value: str, fuzzy: bool) -> None:
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        raise SearchError(f"{keyword} is a sequence: it cannot be matched")
    if vr == "UI":
        value = value.replace(",", "\\")  # OHIF sends backslashes, PS3.18 commas
    elif vr == "PN" and fuzzy and value and "*" not in value and "?" not in value:
        value = "\\".join(v + "*" for v in value.split("\\"))
    ds.add_new(tag_for_keyword(keyword), vr, value)


def _count(name: str, value: str, most: int) -> int:
    if not value.strip().isdigit() or int(value) > most:
        raise SearchError(f"{name}={value!r}: must be a whole number from 0 to {most}")
    return int(value)


def answers(
    matches: Iterable[Dataset], offset: int, limit: int, retrieve_url: Any
) -> tuple[list[dict[str, Any]], bool]:
    """The page's DICOM JSON objects, each with its RetrieveURL (`retrieve_url(ds)`), and
    whether more matches follow it."""
    page = islice(matches, offset, offset + limit + 1 if limit else None)
    out = []
    more = False
    for ds in page:
        if limit and len(out) == limit:
            more = True
            break
        ds.QueryRetrieveLevel = None
        del ds.QueryRetrieveLevel
        url = retrieve_url(ds)
        if url:
            ds.add_new(0x00081190, "UR", url)
        out.append(dicomjson.to_json(ds))
    return out, more
