"""C-FIND matching (PS3.4 C.2.2.2 and C.4.1) on the SQL index.

One SQL SELECT per query (per page of results): the joins of the query level, one WHERE
built from the matching keys, and the computed return keys (NumberOf*Related*,
ModalitiesInStudy, SOPClassesInStudy), added only when the SCU asks for them; instance
counts add up the per-series counters the index keeps. At study level a page's series
counts, instance counts and modalities come from one grouped read of its studies' series
joined to the page (query_keys.study_series_aggregates); the other computed keys are
correlated scalar subqueries. Nothing is matched in Python; Python only turns the selected
columns into response identifiers. Everything
is plain SQLAlchemy Core, so the same query runs on SQLite and PostgreSQL; the one dialect
switch is case-sensitive wildcard matching (SQLite's LIKE folds ASCII case, its GLOB does
not; PostgreSQL's LIKE is case-sensitive).

This module plans a query (:func:`plan`: level, return keys, WHERE) and pages its rows
(:func:`rows`) as plain values, so that every face runs the same matching: :func:`find`
gives pydicom Datasets, the C-FIND SCP encodes the rows itself
(dimse/identifier_encoding.py). The columns and SQL of each key are query_keys.py's, how a
key's value becomes a condition key_matching.py's. Nothing here knows DIMSE.

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

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from sqlalchemy import and_, func, select

from compacs.service import key_matching, query_keys
from compacs.service.key_matching import (
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_UNABLE_TO_PROCESS,
    QueryError,
    uid_values,
)
from compacs.service.storage.index import Index, Instance, Patient, Series, Study

__all__ = [
    "STATUS_IDENTIFIER_MISMATCH",
    "STATUS_UNABLE_TO_PROCESS",
    "Plan",
    "QueryError",
    "answer",
    "find",
    "plan",
    "query_level",
    "rows",
    "uid_values",
]

LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS: dict[str, tuple[str, ...]] = {"patient": LEVELS, "study": LEVELS[1:]}
MODEL_NAMES = {"patient": "Patient Root", "study": "Study Root"}

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

# Tags answered by find() itself, never matched against a column.
_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005
_RETRIEVE_AE_TITLE = 0x00080054
_INSTANCE_AVAILABILITY = 0x00080056


@dataclass
class Plan:
    """What one query runs, as plain values a face can use without DIMSE: the level, the
    return keys in the order of each row's values (`keywords`, with `targets` their tag, VR
    and whether the value is a backslash-joined set), the constant elements of every answer
    (`template`: QueryRetrieveLevel, RetrieveAETitle, zero-length keys), the Specific
    Character Set the requester asked for, and the SQL statement (without paging)."""

    level: str
    statement: Any
    id_column: Any
    keywords: list[str]  # the selected return keys, in column order after the id
    multi: set[str]
    template: Dataset
    character_set: str | None
    # position in `keywords` -> query_keys.PER_STUDY key of the return keys that each page
    # reads from its studies' series at once (see _page); their statement has no column
    per_study: dict[int, str] = field(default_factory=dict)
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
    ``page_size`` (see :func:`rows`). Each response holds the requested keys, the level's
    unique key, QueryRetrieveLevel, RetrieveAETitle when ``retrieve_ae_title`` is given, and
    SpecificCharacterSet when asked or when a value needs it (ISO_IR 192).
    """
    query = plan(index, identifier, model, retrieve_ae_title=retrieve_ae_title)
    return (answer(query, values) for values in rows(index, query, page_size))


def plan(
    index: Index, identifier: Dataset, model: str, *, retrieve_ae_title: str | None = None
) -> Plan:
    """Check ``identifier`` and build its query for ``index``; raises :class:`QueryError`
    for a request that cannot be answered. :func:`find` is this, :func:`rows` and
    :func:`answer`; a face that encodes answers its own way (the C-FIND SCP's
    identifier_encoding, a QIDO-RS) takes the plan and the rows."""
    return _plan(identifier, model, index.engine.dialect.name, retrieve_ae_title)


PAGE_GROWTH = 8  # the largest page, in first pages (see rows)


def rows(index: Index, query: Plan, page_size: int = 1000) -> Iterator[Sequence[Any]]:
    """The values of each match, in ``query.keywords`` order, as the index holds them.

    Keyset paging on the level's primary key: one short read per page, so a slow or
    cancelling requester never holds a database connection or snapshot open. The first page
    holds ``page_size`` rows, each next one twice the last, up to ``PAGE_GROWTH`` times the
    first: a small answer comes after one short read, a long one in few reads (each read costs
    its statement, its round trip and its aggregates' set-up: a 10,000-study universal query
    took 150 ms in pages of 1,000 and 105 ms in pages of 5,000 on PostgreSQL). Rows are Core
    rows (plain tuples): the ORM session's per-row bookkeeping cost more than the SQL on a page
    of a thousand studies."""
    size = page_size
    page = _read_page(index, query, None, size)
    while True:
        following = None
        if len(page) == size:  # there may be more: read it while this page is answered
            next_size = min(size * 2, page_size * PAGE_GROWTH)
            following = _PREFETCH.submit(_read_page, index, query, page[-1][0], next_size)
        try:
            for row in page:
                yield row[1:]
        except GeneratorExit:  # an answer cut short (C-CANCEL): no read for nobody
            if following is not None:
                following.cancel()
            raise
        if following is None:
            return
        page, size = following.result(), next_size


# The next page of a long answer is read in one of these threads while the current one is
# encoded and sent: the database works (and the driver waits, without the GIL) meanwhile.
# Measured on a 10,000-study universal C-FIND, two nodes alternating: 514 -> 417 ms median.
_PREFETCH = ThreadPoolExecutor(max_workers=4, thread_name_prefix="compacs-query-prefetch")


def _read_page(index: Index, query: Plan, last_id: int | None, size: int) -> list[Any]:
    with index.engine.connect() as conn:
        return conn.execute(_page(query, last_id, size)).all()


def _page(query: Plan, last_id: int | None, page_size: int) -> Any:
    """The SELECT of the page after `last_id`. With per-study keys, the page is a CTE whose
    study ids drive one grouped read of their series (query_keys.study_series_aggregates),
    joined back in the order of `query.keywords`; an outer join, so a study without series
    answers 0 series, 0 instances and no modalities, as the correlated subqueries did."""
    statement = query.statement
    if last_id is not None:
        statement = statement.where(query.id_column > last_id)
    statement = statement.order_by(query.id_column).limit(page_size)
    if not query.per_study:
        return statement
    page = statement.cte("page")
    per_study = query_keys.study_series_aggregates(select(page.c.id))
    values: list[Any] = []
    for position in range(len(query.keywords)):
        keyword = query.per_study.get(position)
        if keyword is None:
            values.append(page.c[f"k{position}"])
            continue
        name, empty = query_keys.PER_STUDY[keyword]
        column = per_study.c[name]
        values.append(column if empty is None else func.coalesce(column, empty))
    return (
        select(page.c.id, *values)
        .select_from(page.outerjoin(per_study, per_study.c.study_pk == page.c.id))
        .order_by(page.c.id)
    )


def query_level(identifier: Dataset) -> str:
    """The QueryRetrieveLevel as sent (for logs), "?" when missing or unreadable."""
    try:
        return str(identifier.get("QueryRetrieveLevel", "?") or "?").strip() or "?"
    except Exception:
        return "?"


# --------------------------------------------------------------------------- planning


def _plan(identifier: Dataset, model: str, dialect: str, retrieve_ae: str | None) -> Plan:
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
    per_study: dict[int, str] = {}

    def add(column: Any) -> None:
        # labelled by the key's position, so that _page can pick it out of the page's CTE
        columns.append(column.label(f"k{len(keywords)}"))

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
            add(query_keys.availability(depth))
            keywords.append("InstanceAvailability")
            seen.add("InstanceAvailability")
            continue
        keyword = elem.keyword
        attr, computed = query_keys.ATTRS.get(keyword), query_keys.COMPUTED.get(keyword)
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
            add(column)
            if values is not None:
                condition = key_matching.condition(keyword, column, attr.kind, values, dialect)
                if condition is not None:
                    conditions.append(condition)
        else:
            assert computed is not None
            if depth == 1 and keyword in query_keys.PER_STUDY:
                per_study[len(keywords)] = keyword
            else:
                add(computed.build())
            if computed.multi:
                multi.add(keyword)
            if keyword == "ModalitiesInStudy" and values is not None:
                condition = key_matching.modalities_condition(values, dialect)
                if condition is not None:
                    conditions.append(condition)
            # The counts are return keys only in PS3.4 (no matching type): a value is ignored.
        keywords.append(keyword)

    unique = UNIQUE_KEYS[level]
    if unique not in seen:
        add(query_keys.ATTRS[unique].column)
        keywords.append(unique)
    if retrieve_ae is not None:
        template.RetrieveAETitle = retrieve_ae

    statement = statement.add_columns(*columns)
    if conditions:
        statement = statement.where(and_(*conditions))
    return Plan(
        level, statement, base.id, keywords, multi, template, requested_charset, per_study=per_study
    )


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


# --------------------------------------------------------------------------- answers


def answer(query: Plan, values: Sequence[Any]) -> Dataset:
    """The response identifier of one match (`values`, one of :func:`rows`)."""
    ds = Dataset()
    for elem in query.template:  # fresh elements: the template is shared by all answers
        ds[elem.tag] = DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else elem.value)
    non_ascii = False
    for (tag, vr, multi), value in zip(query.targets, values, strict=True):
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
    elif query.character_set is not None:
        ds.SpecificCharacterSet = query.character_set
    return ds
