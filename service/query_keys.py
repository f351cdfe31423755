"""The keys the index answers and the SQL that answers each: a stored key's column and the
level whose table holds it, a computed return key's correlated subquery (NumberOf*Related*,
ModalitiesInStudy, SOPClassesInStudy) and InstanceAvailability from the blobs' tier.
query.py plans a query from these; they are apart from it so that adding a key is one line
here, whatever face asks for it.

At study level the three keys a study list asks for (NumberOfStudyRelatedSeries,
NumberOfStudyRelatedInstances, ModalitiesInStudy) come instead from one grouped read of a
page's series (:data:`PER_STUDY`, :func:`study_series_aggregates`): three correlated
subqueries per answer made a third of the universal study query's time at 10,000 studies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, case, cast, func, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from compacs.service.key_matching import DA, INT, MULTI, PN, TEXT, TM, UI
from compacs.service.storage.index import Blob, Instance, Patient, Series, Study
from compacs.service.storage.schema import HOT_TIER


@dataclass(frozen=True)
class Attr:
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
class Computed:
    """A return key computed in SQL from the levels below ``level``; ``multi`` values come
    back backslash-joined (an SQL string aggregate) and are split, de-duplicated and sorted."""

    level: int
    build: Callable[[], ColumnElement[Any]]
    multi: bool = False


ATTRS: dict[str, Attr] = {
    "PatientID": Attr(0, Patient.patient_id, TEXT),
    "IssuerOfPatientID": Attr(0, Patient.issuer_of_patient_id, TEXT),
    "PatientName": Attr(0, Patient.patient_name, PN, Study.patient_name),
    "PatientBirthDate": Attr(0, Patient.patient_birth_date, DA, Study.patient_birth_date),
    "PatientSex": Attr(0, Patient.patient_sex, TEXT, Study.patient_sex),
    "OtherPatientIDs": Attr(1, Study.other_patient_ids, MULTI),
    "StudyInstanceUID": Attr(1, Study.study_instance_uid, UI),
    "StudyDate": Attr(1, Study.study_date, DA),
    "StudyTime": Attr(1, Study.study_time, TM),
    "AccessionNumber": Attr(1, Study.accession_number, TEXT),
    "StudyID": Attr(1, Study.study_id, TEXT),
    "StudyDescription": Attr(1, Study.study_description, TEXT),
    "ReferringPhysicianName": Attr(1, Study.referring_physician_name, PN),
    "SeriesInstanceUID": Attr(2, Series.series_instance_uid, UI),
    "Modality": Attr(2, Series.modality, TEXT),
    "SeriesNumber": Attr(2, Series.series_number, INT),
    "SeriesDescription": Attr(2, Series.series_description, TEXT),
    "BodyPartExamined": Attr(2, Series.body_part_examined, TEXT),
    "SOPInstanceUID": Attr(3, Instance.sop_instance_uid, UI),
    "SOPClassUID": Attr(3, Instance.sop_class_uid, UI),
    "InstanceNumber": Attr(3, Instance.instance_number, INT),
    "Rows": Attr(3, Instance.rows, INT),
    "Columns": Attr(3, Instance.columns, INT),
    "BitsStored": Attr(3, Instance.bits_stored, INT),
    "NumberOfFrames": Attr(3, Instance.number_of_frames, INT),
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


COMPUTED: dict[str, Computed] = {
    "NumberOfPatientRelatedStudies": Computed(
        0, lambda: _count(Study.id, where=Study.patient_pk == Patient.id, outer=Patient)
    ),
    "NumberOfPatientRelatedSeries": Computed(
        0,
        lambda: _count(
            Series.id,
            (Study, Series.study_pk == Study.id),
            where=Study.patient_pk == Patient.id,
            outer=Patient,
        ),
    ),
    "NumberOfPatientRelatedInstances": Computed(
        0,
        lambda: _instances(
            (Study, Series.study_pk == Study.id),
            where=Study.patient_pk == Patient.id,
            outer=Patient,
        ),
    ),
    "NumberOfStudyRelatedSeries": Computed(
        1, lambda: _count(Series.id, where=Series.study_pk == Study.id, outer=Study)
    ),
    "NumberOfStudyRelatedInstances": Computed(
        1, lambda: _instances(where=Series.study_pk == Study.id, outer=Study)
    ),
    "ModalitiesInStudy": Computed(
        1, lambda: _distinct_joined(Series.modality, where=Series.study_pk == Study.id), True
    ),
    "SOPClassesInStudy": Computed(
        1,
        lambda: _distinct_joined(
            Instance.sop_class_uid,
            (Series, Instance.series_pk == Series.id),
            where=Series.study_pk == Study.id,
        ),
        True,
    ),
    "NumberOfSeriesRelatedInstances": Computed(2, lambda: Series.instance_count),
}


def availability(depth: int) -> ColumnElement[Any]:
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


# Study-level keys answered from study_series_aggregates' columns (named here) by query.py,
# with the value a study without series gets: what the correlated subqueries above give.
PER_STUDY: dict[str, tuple[str, int | None]] = {
    "NumberOfStudyRelatedSeries": ("series", 0),
    "NumberOfStudyRelatedInstances": ("instances", 0),
    "ModalitiesInStudy": ("modalities", None),
}


def study_series_aggregates(study_ids: Any) -> Any:
    """Per study among `study_ids` (a SELECT of study ids: one page of a query), its series
    count, instance count (the per-series counters) and backslash-joined distinct
    modalities, as columns study_pk, series, instances, modalities: one grouped read of the
    (study_pk, modality, instance_count) index instead of three subqueries per study. The
    modalities are grouped first because SQLite's group_concat takes no DISTINCT with a
    separator; the sums are cast because PostgreSQL sums bigints as numeric."""
    by_modality = (
        select(
            Series.study_pk.label("study_pk"),
            Series.modality.label("modality"),
            func.count().label("n"),
            func.sum(Series.instance_count).label("i"),
        )
        .where(Series.study_pk.in_(study_ids))
        .group_by(Series.study_pk, Series.modality)
        .subquery("by_modality")
    )
    return (
        select(
            by_modality.c.study_pk,
            cast(func.sum(by_modality.c.n), BigInteger).label("series"),
            cast(func.coalesce(func.sum(by_modality.c.i), 0), BigInteger).label("instances"),
            func.aggregate_strings(by_modality.c.modality, "\\").label("modalities"),
        )
        .group_by(by_modality.c.study_pk)
        .subquery("per_study")
    )
