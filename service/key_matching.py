"""One matching key's value(s) as an SQL condition (PS3.4 C.2.2.2), on SQLite and PostgreSQL.

query.py decides which keys match and on which columns (the plan of a query); this module
turns a key's values into the WHERE clause for its column: single value, wildcard, range,
list and empty value matching, with the matching choices that query.py's docstring lists.
Apart from query.py because C-GET/C-MOVE (retrieve.py) read UID keys the same way
(uid_values) and a web face's QIDO-RS runs the same plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.multival import MultiValue
from sqlalchemy import and_, exists, func, literal, or_, select
from sqlalchemy.sql.elements import ColumnElement

from compacs.service.storage.index import Series, Study, uid_in

STATUS_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
STATUS_UNABLE_TO_PROCESS = 0xC000

# Matching kinds: how a key's value is turned into SQL.
TEXT, PN, UI, DA, TM, INT = "text", "pn", "ui", "da", "tm", "int"
MULTI = "multi"  # text values kept backslash-joined in one column: a key matches any of them

_WILDCARDS = re.compile(r"[*?]")
_DIGITS = re.compile(r"\d*")
_TIME = re.compile(r"\d*(\.\d*)?")
_LIKE_ESCAPE = "!"  # not "\\" (the DICOM value separator) nor "^" (PN component separator)


class QueryError(Exception):
    """A query that cannot be answered: ``status`` goes into the C-FIND-RSP, ``reason``
    into its Error Comment (and the log), so the SCU learns what to fix."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


def condition(
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


def modalities_condition(values: Sequence[str], dialect: str) -> ColumnElement[bool] | None:
    """ModalitiesInStudy: the study has a series whose Modality matches any value."""
    match = condition("ModalitiesInStudy", Series.modality, TEXT, values, dialect)
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
