"""C-FIND matching (PS3.4 C.2.2.2 and C.4.1) on the SQL index.

One SQL SELECT per query (per page of results): the joins of the query level, one WHERE
built from the matching keys, and correlated scalar subqueries for the computed return keys
(NumberOf*Related*, ModalitiesInStudy, SOPClassesInStudy), added only when the SCU asks for
them; instance counts add up the per-series counters the index keeps. Nothing is matched
in Python; Python only turns the selected columns into response identifiers. Everything
is plain SQLAlchemy Core, so the same query runs on SQLite and PostgreSQL; the one dialect
switch is case-sensitive wildcard matching (SQLite's LIKE folds ASCII case, its GLOB does
not; PostgreSQL's LIKE is case-sensitive).

Matching choices (PS3.4 C.2.2.2), all documented in the docstrings below:
- single value: exact and case-sensitive, except PN (PatientName, ReferringPhysicianName),
  matched case-insensitively as PS3.4 C.2.2.2.1 permits and Orthanc does by default
  (``CaseSensitivePN`` false), so "smith*" finds "SMITH^JOHN";
- wildcards ``*`` and ``?`` on text keys (CS, LO, SH, PN); a value of only ``*`` is universal
  matching (it also matches entities without a value). Never on UIDs (C.2.2.2.4 excludes UI):
  a UI key is a UID or a list of UIDs matched exactly (uid_values, index.uid_in), the same
  in C-GET and C-MOVE, so "*" there matches no UID rather than every one;
- ranges ``A-B``, ``-B``, ``A-`` on DA and TM keys; a partial date or time ("2020", "-2020",
  "0930") is taken as the whole period it names, like "20200101-20201231";
- a list of values (backslash) matches any of them: UID list matching for UI keys
  (C.2.2.2.2) and, leniently, on the other keys (ModalitiesInStudy "CT\\MR" is the common use);
- ``""`` (two double quotes) is empty value matching: entities without a value;
- ModalitiesInStudy at study level matches a study when any of its series matches.

Patient attributes (schema.Patient, schema.Study): at STUDY level and below, PatientName,
PatientBirthDate, PatientSex, IssuerOfPatientID and OtherPatientIDs are the study's own (as
received with its objects); at PATIENT level a row is one name and birth date under a
PatientID (+ IssuerOfPatientID), so a PatientID whose studies disagree answers once per name.

Hierarchy (C.4.1.2.2), lenient like Orthanc: keys of the query level and of the levels above
it are matching keys (the unique keys of the upper levels identify the parent; other upper
level keys narrow further, as a relational query would); keys of lower levels and keys the
index does not hold are not matched and come back with zero length. A query without the unique
keys of the upper levels is answered across all parents instead of refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from sqlalchemy import and_, case, exists, func, literal, or_, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from compacs.service.dimse.identifier_encoding import IdentifierEncoder, Target
from compacs.service.storage.index import (
    Blob,
    Index,
    Instance,
    Patient,
    Series,
    Study,
    uid_in,
)
from compacs.service.storage.schema import HOT_TIER

LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS: dict[str, tuple[str, ...]] = {"patient": LEVELS, "study": LEVELS[1:]}
MODEL_NAMES = {"patient": "Patient Root", "study": "Study Root"}

STATUS_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
STATUS_UNABLE_TO_PROCESS = 0xC000

# The unique key of each level (PS3.4 C.4.1.1.3): always returned, so that an answer can be
# retrieved even when the SCU forgot to ask for it.
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

# Tables of each level, and the ON clauses that join a level to the one above it.
_TABLES: tuple[Any, ...] = (Patient, Study, Series, Instance)
_JOINS: tuple[Any, ...] = (
    None,
    Study.patient_pk == Patient.id,
    Series.study_pk == Study.id,
    Instance.series_pk == Series.id,
)

# Matching kinds: how a key's value is turned into SQL.
TEXT, PN, UI, DA, TM, INT = "text", "pn", "ui", "da", "tm", "int"
MULTI = "multi"  # text values kept backslash-joined in one column: a key matches any of them

# Tags answered by find() itself, never matched against a column.
_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005
_RETRIEVE_AE_TITLE = 0x00080054
_INSTANCE_AVAILABILITY = 0x00080056

_WILDCARDS = re.compile(r"[*?]")
_DIGITS = re.compile(r"\d*")
_TIME = re.compile(r"\d*(\.\d*)?")
_LIKE_ESCAPE = "!"  # not "\\" (the DICOM value separator) nor "^" (PN component separator)


class QueryError(Exception):
    """A C-FIND request that cannot be answered: ``status`` goes into the C-FIND-RSP,
    ``reason`` into its Error Comment (and the log), so the SCU learns what to fix."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class _Attr:
    """A key stored in a column: the level whose table holds it and how it matches;
    `below`, where given, is the column that queries of a lower level use (the patient
    attributes each study keeps of its own, schema.Study)."""

    level: int
    column: Any
    kind: str
    below: Any = None

    def column_at(self, depth: int) -> Any:
        return self.below if depth > self.level and self.below is not None else self.column


@dataclass(frozen=True)
class _Computed:
    """A return key computed in SQL from the levels below ``level``; ``multi`` values come
    back backslash-joined (an SQL string aggregate) and are split, de-duplicated and sorted."""

    level: int
    build: Callable[[], ColumnElement[Any]]
    multi: bool = False


_ATTRS: dict[str, _Attr] = {
    "PatientID": _Attr(0, Patient.patient_id, TEXT),
    "IssuerOfPatientID": _Attr(0, Patient.issuer_of_patient_id, TEXT),
    "PatientName": _Attr(0, Patient.patient_name, PN, Study.patient_name),
    "PatientBirthDate": _Attr(0, Patient.patient_birth_date, DA, Study.patient_birth_date),
    "PatientSex": _Attr(0, Patient.patient_sex, TEXT, Study.patient_sex),
    "OtherPatientIDs": _Attr(1, Study.other_patient_ids, MULTI),
    "StudyInstanceUID": _Attr(1, Study.study_instance_uid, UI),
    "StudyDate": _Attr(1, Study.study_date, DA),
    "StudyTime": _Attr(1, Study.study_time, TM),
    "AccessionNumber": _Attr(1, Study.accession_number, TEXT),
    "StudyID": _Attr(1, Study.study_id, TEXT),
    "StudyDescription": _Attr(1, Study.study_description, TEXT),
    "ReferringPhysicianName": _Attr(1, Study.referring_physician_name, PN),
    "SeriesInstanceUID": _Attr(2, Series.series_instance_uid, UI),
    "Modality": _Attr(2, Series.modality, TEXT),
    "SeriesNumber": _Attr(2, Series.series_number, INT),
    "SeriesDescription": _Attr(2, Series.series_description, TEXT),
    "BodyPartExamined": _Attr(2, Series.body_part_examined, TEXT),
    "SOPInstanceUID": _Attr(3, Instance.sop_instance_uid, UI),
    "SOPClassUID": _Attr(3, Instance.sop_class_uid, UI),
    "InstanceNumber": _Attr(3, Instance.instance_number, INT),
    "Rows": _Attr(3, Instance.rows, INT),
    "Columns": _Attr(3, Instance.columns, INT),
    "BitsStored": _Attr(3, Instance.bits_stored, INT),
    "NumberOfFrames": _Attr(3, Instance.number_of_frames, INT),
}


def _aggregate(
    value: Any, start: Any, *joins: tuple[Any, Any], where: Any, outer: Any
) -> ColumnElement[Any]:
    """`value` (an aggregate) over the rows of `start` joined as given, correlated with the
    outer query's `outer` row."""
    query = select(value).select_from(start)
    for table, on in joins:
        query = query.join(table, on)
    return query.where(where).correlate(outer).scalar_subquery()


def _count(what: Any, *joins: tuple[Any, Any], where: Any, outer: Any) -> ColumnElement[Any]:
    return _aggregate(func.count(what), what.class_, *joins, where=where, outer=outer)


def _instances(*joins: tuple[Any, Any], where: Any, outer: Any) -> ColumnElement[Any]:
    """Instances below the outer row, from the per-series counters (index.Series): counting
    instance rows cost 115-170 ms of a study query answering thousands of studies."""
    total = func.coalesce(func.sum(Series.instance_count), 0)
    return _aggregate(total, Series, *joins, where=where, outer=outer)


def _distinct_joined(column: Any, *joins: tuple[Any, Any], where: Any) -> ColumnElement[Any]:
    """Backslash-joined distinct values: aggregate_strings is group_concat on SQLite and
    string_agg on PostgreSQL; the DISTINCT lives in a derived table because SQLite's
    group_concat(DISTINCT x, sep) does not take a separator."""
    inner = select(column.label("v")).select_from(column.class_)
    for table, on in joins:
        inner = inner.join(table, on)
    inner = inner.where(where, column.is_not(None)).distinct().correlate(Study).subquery()
    return select(func.aggregate_strings(inner.c.v, "\\")).scalar_subquery()


_COMPUTED: dict[str, _Computed] = {
    "NumberOfPatientRelatedStudies": _Computed(
        0, lambda: _count(Study.id, where=Study.patient_pk == Patient.id, outer=Patient)
    ),
    "NumberOfPatientRelatedSeries": _Computed(
        0,
        lambda: _count(
            Series.id,
            (Study, Series.study_pk == Study.id),
            where=Study.patient_pk == Patient.id,
            outer=Patient,
        ),
    ),
    "NumberOfPatientRelatedInstances": _Computed(
        0,
        lambda: _instances(
            (Study, Series.study_pk == Study.id),
            where=Study.patient_pk == Patient.id,
            outer=Patient,
        ),
    ),
    "NumberOfStudyRelatedSeries": _Computed(
        1, lambda: _count(Series.id, where=Series.study_pk == Study.id, outer=Study)
    ),
    "NumberOfStudyRelatedInstances": _Computed(
        1, lambda: _instances(where=Series.study_pk == Study.id, outer=Study)
    ),
    "ModalitiesInStudy": _Computed(
        1, lambda: _distinct_joined(Series.modality, where=Series.study_pk == Study.id), True
    ),
    "SOPClassesInStudy": _Computed(
        1,
        lambda: _distinct_joined(
            Instance.sop_class_uid,
            (Series, Instance.series_pk == Series.id),
            where=Series.study_pk == Study.id,
        ),
        True,
    ),
    "NumberOfSeriesRelatedInstances": _Computed(2, lambda: Series.instance_count),
}


def _availability(depth: int) -> ColumnElement[Any]:
    """InstanceAvailability from the blobs' tier: ONLINE while every instance below the row
    sits on the hot tier, NEARLINE once one was moved to a colder tier (retrieval decodes it
    from there: slower, never refused). Driven from the (few) cold blobs through their index."""
    inner = aliased(Instance)
    cold = select(Blob.id).join(inner, inner.blob_pk == Blob.id).where(Blob.tier != HOT_TIER)
    if depth == 3:
        cold = cold.where(inner.id == Instance.id)
    elif depth == 2:
        cold = cold.where(inner.series_pk == Series.id)
    else:
        inner_series = aliased(Series)
        cold = cold.join(inner_series, inner.series_pk == inner_series.id)
        if depth == 1:
            cold = cold.where(inner_series.study_pk == Study.id)
        else:
            inner_study = aliased(Study)
            cold = cold.join(inner_study, inner_series.study_pk == inner_study.id).where(
                inner_study.patient_pk == Patient.id
            )
    return case((cold.exists(), "NEARLINE"), else_="ONLINE")


@dataclass
class _Plan:
    """What one C-FIND runs: the statement (without paging) and how to answer each row."""

    level: str
    statement: Any
    id_column: Any
    keywords: list[str]  # the selected return keys, in column order after the id
    multi: set[str]
    template: Dataset  # QueryRetrieveLevel, RetrieveAETitle, zero-length keys, constants
    character_set: str | None
    # (tag, VR, multi-valued) per selected key, looked up once: building the answers with
    # DataElement directly takes about half the time of setattr by keyword.
    targets: list[tuple[int, str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for keyword in self.keywords:
            tag = tag_for_keyword(keyword)
            assert tag is not None, keyword
            self.targets.append((tag, dictionary_VR(tag), keyword in self.multi))


# --------------------------------------------------------------------------- public API


def find(
    index: Index,
    identifier: Dataset,
    model: str,
    *,
    retrieve_ae_title: str | None = None,
    page_size: int = 1000,
) -> Iterator[Dataset]:
    """Match ``identifier`` (a C-FIND request identifier) in the ``model`` information model
    ("patient" or "study" root) and yield one response identifier per match.

    The request is checked and the SQL built before this returns, so a bad request raises
    :class:`QueryError` here and not at the first ``next()``. Matches come in pages of
    ``page_size`` (keyset paging on the level's primary key): one short read transaction per
    page, so a slow or cancelling SCU never holds a database connection or snapshot open.
    Each response holds the requested keys, the level's unique key, QueryRetrieveLevel,
    RetrieveAETitle when ``retrieve_ae_title`` is given, and SpecificCharacterSet when asked
    or when a value needs it (ISO_IR 192).
    """
    plan = _plan(identifier, model, index.engine.dialect.name, retrieve_ae_title)
    return (_response(plan, row) for row in _rows(index, plan, page_size))


def find_encoded(
    index: Index,
    identifier: Dataset,
    model: str,
    *,
    implicit_vr: bool,
    retrieve_ae_title: str | None = None,
    page_size: int = 1000,
) -> Iterator[bytes]:
    """:func:`find`, with each answer already encoded in (implicit or explicit VR) little
    endian: what the C-FIND SCP sends, at a fraction of the cost of a Dataset written by
    pydicom (see identifier_encoding). The bytes are those of :func:`find`'s Datasets."""
    plan = _plan(identifier, model, index.engine.dialect.name, retrieve_ae_title)
    encoder = IdentifierEncoder(
        plan.template,
        [Target(tag, vr, multi) for tag, vr, multi in plan.targets],
        plan.character_set,
        implicit_vr=implicit_vr,
    )
    return (encoder.encode(row[1:]) for row in _rows(index, plan, page_size))


def query_level(identifier: Dataset) -> str:
    """The QueryRetrieveLevel as sent (for logs), "?" when missing or unreadable."""
    try:
        return str(identifier.get("QueryRetrieveLevel", "?") or "?").strip() or "?"
    except Exception:
        return "?"


# --------------------------------------------------------------------------- planning


def _plan(identifier: Dataset, model: str, dialect: str, retrieve_ae: str | None) -> _Plan:
    if model not in MODEL_LEVELS:
        raise ValueError(f"unknown query model {model!r}: 'patient' or 'study'")
    level = _level(identifier, model)
    depth = LEVELS.index(level)
    base = _TABLES[depth]
    statement = select(base.id).select_from(base)
    for d in range(depth - 1, -1, -1):
        statement = statement.join(_TABLES[d], _JOINS[d + 1])

    template = Dataset()
    template.QueryRetrieveLevel = level
    keywords: list[str] = []
    multi: set[str] = set()
    columns: list[Any] = []
    conditions: list[Any] = []
    requested_charset: str | None = None
    seen: set[str] = set()

    for elem in _elements(identifier):
        tag = int(elem.tag)
        if tag == _QUERY_RETRIEVE_LEVEL:
            continue
        if tag == _SPECIFIC_CHARACTER_SET:
            requested_charset = _charset(elem)
            continue
        if tag == _RETRIEVE_AE_TITLE:
            if retrieve_ae is None:
                template.add_new(elem.tag, "AE", None)
            continue
        if tag == _INSTANCE_AVAILABILITY:
            keywords.append("InstanceAvailability")
            columns.append(_availability(depth))
            seen.add("InstanceAvailability")
            continue
        keyword = elem.keyword
        attr, computed = _ATTRS.get(keyword), _COMPUTED.get(keyword)
        usable = (attr and attr.level <= depth) or (computed and computed.level <= depth)
        if not usable:
            # Unknown to the index, or of a lower level: not matched, returned empty.
            if " or " not in elem.VR:  # an ambiguous VR (implicit VR request) cannot be sent
                template.add_new(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)
            continue
        seen.add(keyword)
        values = _values(elem)
        if attr is not None:
            column = attr.column_at(depth)
            columns.append(column)
            if values is not None:
                condition = _condition(keyword, column, attr.kind, values, dialect)
                if condition is not None:
                    conditions.append(condition)
        else:
            assert computed is not None
            columns.append(computed.build())
            if computed.multi:
                multi.add(keyword)
            if keyword == "ModalitiesInStudy" and values is not None:
                condition = _modalities_condition(values, dialect)
                if condition is not None:
                    conditions.append(condition)
            # The counts are return keys only in PS3.4 (no matching type): a value is ignored.
        keywords.append(keyword)

    unique = UNIQUE_KEYS[level]
    if unique not in seen:
        keywords.append(unique)
        columns.append(_ATTRS[unique].column)
    if retrieve_ae is not None:
        template.RetrieveAETitle = retrieve_ae

    statement = statement.add_columns(*columns)
    if conditions:
        statement = statement.where(and_(*conditions))
    return _Plan(level, statement, base.id, keywords, multi, template, requested_charset)


def _level(identifier: Dataset, model: str) -> str:
    allowed = MODEL_LEVELS[model]
    name = MODEL_NAMES[model]
    try:
        raw = identifier.get("QueryRetrieveLevel")
    except Exception as exc:
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH, f"unreadable QueryRetrieveLevel: {exc}"
        ) from exc
    level = str(raw or "").strip().upper()
    if not level:
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH,
            f"QueryRetrieveLevel (0008,0052) missing; {name}: {'/'.join(allowed)}",
        )
    if level not in allowed:
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH,
            f"QueryRetrieveLevel {level!r} not in {name} ({'/'.join(allowed)})",
        )
    return level


def _elements(identifier: Dataset) -> Iterator[DataElement]:
    """The identifier's elements, skipping group lengths, command/meta groups and private
    tags (we hold no private attributes and cannot name a creator for them)."""
    try:
        for elem in identifier:
            tag = elem.tag
            if tag.group in (0x0000, 0x0002) or tag.element == 0 or tag.is_private:
                continue
            yield elem
    except Exception as exc:  # pydicom could not decode an element the SCU sent
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH, f"identifier cannot be decoded: {exc}"
        ) from exc


def _charset(elem: DataElement) -> str | None:
    values = _values(elem)
    return "\\".join(values) if values else None


def _values(elem: DataElement) -> list[str] | None:
    """A key's values as stripped strings; None for a return key (universal matching)."""
    try:
        value = elem.value
    except Exception as exc:
        raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"{elem.keyword or elem.tag}: {exc}") from exc
    if value is None or isinstance(value, bytes | bytearray) or elem.VR == "SQ":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    out = [str(v).strip() for v in items]
    out = [v for v in out if v]
    return out or None


# --------------------------------------------------------------------------- matching


def uid_values(value: Any) -> list[str]:
    """The UIDs a UI key names (PS3.4 C.2.2.2.2): its backslash-separated values without
    their padding (space, NUL), empty ones dropped. "*" and "?" stay what they are: UIDs take
    no wildcards, so such a value matches no UID. C-FIND and C-GET/C-MOVE both read UID keys
    with this and match them with index.uid_in."""
    if value is None:
        return []
    items = value if isinstance(value, MultiValue | list | tuple) else str(value).split("\\")
    out = [str(v).strip(" \0") for v in items]
    return [v for v in out if v]


def _condition(
    keyword: str, column: Any, kind: str, values: Sequence[str], dialect: str
) -> ColumnElement[bool] | None:
    """SQL for one key's value(s) (PS3.4 C.2.2.2); None means universal matching."""
    if kind == UI:
        return uid_in(column, uid_values(values))
    if any(v.strip("*") == "" for v in values):
        return None  # "*" is universal matching (C.2.2.2.3), whatever the VR
    conditions: list[ColumnElement[bool]] = []
    for value in values:
        if value == '""':  # empty value matching: no value (or, for text, a blank one)
            empty = column.is_(None)
            conditions.append(empty if kind == INT else or_(empty, column == ""))
        elif kind in (TEXT, PN):
            conditions.append(_text_match(column, value, fold=kind == PN, dialect=dialect))
        elif kind == MULTI:
            conditions.append(_element_match(column, value, dialect))
        elif kind == DA:
            conditions.append(_range(keyword, column, value, _date_bounds))
        elif kind == TM:
            conditions.append(_range(keyword, column, value, _time_bounds))
        else:
            conditions.append(column == _integer(keyword, value))
    return conditions[0] if len(conditions) == 1 else or_(*conditions)


def _text_match(column: Any, value: str, *, fold: bool, dialect: str) -> ColumnElement[bool]:
    """Single value or wildcard matching; PN (fold=True) ignores case on both sides, in SQL,
    so that SQLite and PostgreSQL fold the stored and the asked value the same way."""
    if not _WILDCARDS.search(value):
        if fold:
            return func.lower(column) == func.lower(literal(value))
        return column == value
    if fold:
        # lower() LIKE lower() (what ilike() is on SQLite), not PostgreSQL's ILIKE: the
        # index on lower(name) with text_pattern_ops (revision 0009) serves a prefix of it.
        pattern = func.lower(literal(_like_pattern(value)))
        return func.lower(column).like(pattern, escape=_LIKE_ESCAPE)
    if dialect == "sqlite":
        # SQLite's LIKE ignores ASCII case; GLOB is its case-sensitive pattern operator.
        return column.op("GLOB")(_glob_pattern(value))
    return column.like(_like_pattern(value), escape=_LIKE_ESCAPE)


def _element_match(column: Any, value: str, dialect: str) -> ColumnElement[bool]:
    """One value (wildcards allowed, case-sensitive) against any of the backslash-joined
    values of `column`: "\\A1\\B2\\" contains "\\B2\\". A wildcard may span values."""
    wrapped = literal("\\") + column + literal("\\")
    if dialect == "sqlite":
        return wrapped.op("GLOB")("*\\" + _glob_pattern(value) + "\\*")
    return wrapped.like("%\\" + _like_pattern(value) + "\\%", escape=_LIKE_ESCAPE)


def _like_pattern(value: str) -> str:
    out = []
    for ch in value:
        if ch in (_LIKE_ESCAPE, "%", "_"):
            out.append(_LIKE_ESCAPE + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _glob_pattern(value: str) -> str:
    # * and ? mean the same in GLOB; "[" would open a character class: make it literal.
    return value.replace("[", "[[]")


def _modalities_condition(values: Sequence[str], dialect: str) -> ColumnElement[bool] | None:
    """ModalitiesInStudy: the study has a series whose Modality matches any value."""
    match = _condition("ModalitiesInStudy", Series.modality, TEXT, values, dialect)
    if match is None:
        return None
    return exists(select(Series.id).where(Series.study_pk == Study.id, match).correlate(Study))


def _range(
    keyword: str,
    column: Any,
    value: str,
    bounds: Callable[[str, str], tuple[str, str] | None],
) -> ColumnElement[bool]:
    """Single value or range matching on DA/TM strings (YYYYMMDD, HHMMSS.FFFFFF), which
    sort as their dates and times do, so the comparison is a plain string comparison and can
    use the column's index."""
    if "-" in value:
        lo, _, hi = value.partition("-")
        lo_b = bounds(keyword, lo) if lo else None
        hi_b = bounds(keyword, hi) if hi else None
        if lo_b is None and hi_b is None:
            raise QueryError(STATUS_IDENTIFIER_MISMATCH, f"{keyword}: empty range {value!r}")
        parts = []
        if lo_b is not None:
            parts.append(column >= lo_b[0])
        if hi_b is not None:
            parts.append(column <= hi_b[1])
        return and_(*parts)
    exact = bounds(keyword, value)
    assert exact is not None
    first, last = exact
    return column == first if first == last else and_(column >= first, column <= last)


def _date_bounds(keyword: str, text: str) -> tuple[str, str]:
    """First and last YYYYMMDD of a (partial) date; "2020" is the whole year. Accepts the
    ACR-NEMA form YYYY.MM.DD that old SCUs still send."""
    text = text.strip().replace(".", "")
    if not _DIGITS.fullmatch(text) or not 4 <= len(text) <= 8:
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH,
            f"{keyword}: {text!r} is not a date (YYYYMMDD) or range (A-B, -B, A-)",
        )
    if len(text) == 8:
        return text, text
    return text.ljust(8, "0"), text.ljust(8, "9")


def _time_bounds(keyword: str, text: str) -> tuple[str, str]:
    """First and last HHMMSS.FFFFFF of a (partial) time; "09" is the whole hour. A stored
    time shorter than the bound compares as its start ("0930" < "093000"), as it should."""
    text = text.strip().replace(":", "")
    if not text or not _TIME.fullmatch(text) or len(text.split(".")[0]) not in (2, 4, 6):
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH,
            f"{keyword}: {text!r} is not a time (HHMMSS.FFFFFF) or range (A-B, -B, A-)",
        )
    if "." in text or len(text) == 6:
        return text, text
    return text, text.ljust(6, "9")


def _integer(keyword: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise QueryError(
            STATUS_IDENTIFIER_MISMATCH, f"{keyword}: {value!r} is not an integer"
        ) from None


# --------------------------------------------------------------------------- answers


def _rows(index: Index, plan: _Plan, page_size: int) -> Iterator[Sequence[Any]]:
    last_id: int | None = None
    while True:
        statement = plan.statement
        if last_id is not None:
            statement = statement.where(plan.id_column > last_id)
        statement = statement.order_by(plan.id_column).limit(page_size)
        with index.reading() as session:
            rows = session.execute(statement).all()
        yield from rows
        if len(rows) < page_size:
            return
        last_id = rows[-1][0]


def _response(plan: _Plan, row: Sequence[Any]) -> Dataset:
    ds = Dataset()
    for elem in plan.template:  # fresh elements: the template is shared by all answers
        ds[elem.tag] = DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else elem.value)
    non_ascii = False
    for (tag, vr, multi), value in zip(plan.targets, row[1:], strict=True):
        if value == "":
            value = None
        elif multi and value is not None:
            parts = sorted({v for v in str(value).split("\\") if v})
            value = parts[0] if len(parts) == 1 else parts
        elif isinstance(value, str) and not value.isascii():
            non_ascii = True
        # Values are what the index holds (received and parsed before): validating them again
        # would be half the cost of an answer.
        ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"  # values are stored decoded: answer in UTF-8
    elif plan.character_set is not None:
        ds.SpecificCharacterSet = plan.character_set
    return ds
