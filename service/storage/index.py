"""The SQL index: patients, studies, series, instances and an audit trail.

SQLAlchemy 2 with portable types only, so the same code runs on SQLite (the embedded
default, WAL) and PostgreSQL (at scale). The schema is owned by the Alembic migrations in
`migrations/`; `Index.open` brings any database up to the newest revision.

One node process is one writer: writes go through a lock, which on SQLite avoids the
3-25 ms lock waits measured with concurrent writers, and on PostgreSQL avoids the
duplicate-key races of two associations creating the same study at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
)

STATE_PENDING = "pending"  # acknowledged, durable as received, compression not yet done
STATE_STORED = "stored"  # in its final stored form
STATE_PARKED = "parked"  # compression failed [ingest] max_attempts times: kept as received


class ReceivedVersion(NamedTuple):
    received_hash: str | None
    received_transfer_syntax: str
    blob_path: str


class Problem(NamedTuple):
    """An instance an administrator should hear of: flagged defects, or parked."""

    sop_instance_uid: str
    blob_path: str
    state: str
    defects: str | None
    last_error: str | None


class PendingObject(NamedTuple):
    sop_instance_uid: str
    blob_path: str
    checksum: str
    calling_ae: str | None
    study_instance_uid: str
    series_instance_uid: str


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patient"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_id: Mapped[str | None] = mapped_column(String(64))
    study_description: Mapped[str | None] = mapped_column(Text)
    referring_physician_name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(Text)
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    # kept by add_received (rows are never deleted): C-FIND's instance counts read it
    instance_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    # As received: the syntax and a hash of the data set (without its file meta group), to
    # tell a harmless re-send from a changed one.
    received_transfer_syntax: Mapped[str] = mapped_column(String(64))
    received_size: Mapped[int] = mapped_column(BigInteger)
    received_hash: Mapped[str | None] = mapped_column(String(80))
    # Why the object is kept as received although non-conformant (validate.Defect texts and
    # undecodable pixel data), "; "-joined; NULL when nothing was found.
    defects: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    # As stored: while pending, the blob is the received object under incoming/.
    state: Mapped[str] = mapped_column(String(16), index=True)
    stored_transfer_syntax: Mapped[str] = mapped_column(String(64))
    codec: Mapped[str | None] = mapped_column(String(32), index=True)
    stored_size: Mapped[int] = mapped_column(BigInteger)
    blob_path: Mapped[str] = mapped_column(String(255))
    checksum: Mapped[str] = mapped_column(String(80))
    tier: Mapped[str] = mapped_column(String(16), default="hot")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    series: Mapped[Series] = relationship(back_populates="instances")


# Built once: add_received runs it for every instance, on the acknowledgement's path.
_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("pk"))
    .values(instance_count=Series.instance_count + 1)
)


class AuditEvent(Base):
    __tablename__ = "audit_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


def _get_or_add(
    s: Session, model: type, key: Any, value: str, values: dict[str, Any], update: bool
) -> Any:
    row = s.scalar(select(model).where(key == value))
    if row is None:
        row = model(**{key.key: value}, **values)
        s.add(row)
    elif update:
        for name, new in values.items():
            setattr(row, name, new)
    s.flush()
    return row


def _uid(ds: Any, keyword: str) -> str:
    """A UID as the index keys it: validate.inspect has made sure it is there."""
    return str(ds.get(keyword)).rstrip("\0 ")


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


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema to the newest Alembic revision (or to `revision`)."""
    cfg = AlembicConfig()
    cfg.set_main_option(
        "script_location", str(resources.files("compacs.service.storage").joinpath("migrations"))
    )
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


class Index:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.write_lock = threading.Lock()
        self._series_pks: dict[str, int] = {}  # series UID -> row id; rows are never deleted

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> Index:
        engine = create_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        if upgrade:
            migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """One serialised write transaction, committed on success."""
        with self.write_lock, Session(self.engine, expire_on_commit=False) as session:
            yield session
            session.commit()

    def reading(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # --- ingest (hot path: SQLAlchemy Core, cached parent rows; the ORM cost more CPU per
    # image than receiving it did, measured with py-spy) ---
    def received_version(self, sop_uid: str) -> ReceivedVersion | None:
        """What is held for a SOP Instance UID, to tell a re-send from a new object."""
        table = Instance.__table__
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    table.c.received_hash, table.c.received_transfer_syntax, table.c.blob_path
                ).where(table.c.sop_instance_uid == sop_uid)
            ).first()
        return ReceivedVersion(*row) if row else None

    def add_received(self, ds: Any, **fields: Any) -> None:
        """Index a newly received object (state pending), creating its patient/study/series."""
        series_uid = _uid(ds, "SeriesInstanceUID")
        with self.write_lock:
            series_pk = self._series_pks.get(series_uid)
            if series_pk is None:
                with Session(self.engine) as s:
                    series_pk = self._series_for(s, ds).id
                    s.commit()
                self._series_pks[series_uid] = series_pk
            with self.engine.begin() as conn:
                conn.execute(
                    Instance.__table__.insert().values(
                        series_pk=series_pk,
                        **{"state": STATE_PENDING, **_instance_values(ds), **fields},
                    )
                )
                conn.execute(_COUNT_INSTANCE, {"pk": series_pk})

    def replace_received(self, ds: Any, **fields: Any) -> None:
        """Point an existing instance at a newly received version (on_duplicate = replace).

        The new version's patient, study and series values replace the index's, and an
        instance re-sent under another study or series moves there (its counters follow).
        """
        with self.writing() as s:
            inst = s.scalar(
                select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))
            )
            series = self._series_for(s, ds, update=True)
            if inst.series_pk != series.id:
                s.execute(
                    update(Series)
                    .where(Series.id == inst.series_pk)
                    .values(instance_count=Series.instance_count - 1)
                )
                series.instance_count += 1
            for key, value in {**_instance_values(ds), **fields}.items():
                setattr(inst, key, value)
            inst.series_pk = series.id
            inst.state, inst.codec, inst.stored_at = STATE_PENDING, None, None
            inst.attempts, inst.last_error = 0, None
        self._series_pks.clear()  # a series may have moved to another study

    def record_failure(
        self, sop_uid: str, expected_blob: str, error: str, max_attempts: int
    ) -> str | None:
        """Count a failed compression attempt: the row's state afterwards (pending, or parked
        after `max_attempts`), or None if the row no longer holds that blob (replaced)."""
        table = Instance.__table__
        mine = (
            (table.c.sop_instance_uid == sop_uid)
            & (table.c.state == STATE_PENDING)
            & (table.c.blob_path == expected_blob)
        )
        with self.write_lock, self.engine.begin() as conn:
            attempts = conn.execute(select(table.c.attempts).where(mine)).scalar()
            if attempts is None:
                return None
            state = STATE_PARKED if attempts + 1 >= max_attempts else STATE_PENDING
            conn.execute(
                table.update()
                .where(mine)
                .values(attempts=attempts + 1, last_error=error[:2000], state=state)
            )
            return state

    def still_pending(self, sop_uid: str, expected_blob: str) -> bool:
        """Whether the row still waits for compression of that very blob."""
        table = Instance.__table__
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(table.c.id).where(
                        table.c.sop_instance_uid == sop_uid,
                        table.c.state == STATE_PENDING,
                        table.c.blob_path == expected_blob,
                    )
                ).first()
                is not None
            )

    def blob_paths(self, prefix: str) -> set[str]:
        """The blobs under `prefix` that rows point at."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Instance.blob_path).where(Instance.blob_path.startswith(prefix))
            )
            return {path for (path,) in rows}

    def problems(self) -> list[Problem]:
        """Flagged and parked instances, for verify."""
        with self.reading() as s:
            rows = s.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.blob_path,
                    Instance.state,
                    Instance.defects,
                    Instance.last_error,
                )
                .where((Instance.defects.is_not(None)) | (Instance.state == STATE_PARKED))
                .order_by(Instance.id)
            )
            return [Problem(*r) for r in rows]

    def mark_stored(self, sop_uid: str, expected_blob: str, **fields: Any) -> bool:
        """Record the compressed form; False if the instance changed meanwhile (replaced)."""
        table = Instance.__table__
        with self.write_lock, self.engine.begin() as conn:
            result = conn.execute(
                table.update()
                .where(
                    table.c.sop_instance_uid == sop_uid,
                    table.c.state == STATE_PENDING,
                    table.c.blob_path == expected_blob,
                )
                .values(state=STATE_STORED, stored_at=utcnow(), **fields)
            )
            return result.rowcount == 1

    def pending(self) -> list[PendingObject]:
        """Every object still waiting for compression, oldest first."""
        with self.reading() as s:
            rows = s.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.blob_path,
                    Instance.checksum,
                    Instance.calling_ae,
                    Study.study_instance_uid,
                    Series.series_instance_uid,
                )
                .select_from(Instance)
                .join(Series)
                .join(Study)
                .where(Instance.state == STATE_PENDING)
                .order_by(Instance.id)
            )
            return [PendingObject(*r) for r in rows]

    def audit(
        self,
        kind: str,
        *,
        sop_uid: str | None = None,
        calling_ae: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self.writing() as s:
            s.add(
                AuditEvent(
                    kind=kind, sop_instance_uid=sop_uid, calling_ae=calling_ae, detail=detail
                )
            )

    def _series_for(self, s: Session, ds: Any, update: bool = False) -> Series:
        """The series row of `ds`, created with its study and patient where missing; with
        `update`, existing rows take the values of `ds` (a replaced object)."""
        patient_values = {
            "patient_name": _text(ds, "PatientName"),
            "patient_birth_date": _text(ds, "PatientBirthDate", 8),
            "patient_sex": _text(ds, "PatientSex", 16),
        }
        patient = _get_or_add(
            s, Patient, Patient.patient_id, _text(ds, "PatientID", 64) or "", patient_values, update
        )
        study_values = {
            "patient_pk": patient.id,
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "accession_number": _text(ds, "AccessionNumber", 64),
            "study_id": _text(ds, "StudyID", 64),
            "study_description": _text(ds, "StudyDescription"),
            "referring_physician_name": _text(ds, "ReferringPhysicianName"),
        }
        study = _get_or_add(
            s, Study, Study.study_instance_uid, _uid(ds, "StudyInstanceUID"), study_values, update
        )
        series_values = {
            "study_pk": study.id,
            "modality": _text(ds, "Modality", 16),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription"),
            "body_part_examined": _text(ds, "BodyPartExamined", 64),
        }
        return _get_or_add(
            s,
            Series,
            Series.series_instance_uid,
            _uid(ds, "SeriesInstanceUID"),
            series_values,
            update,
        )

    # --- reading for export, verify, stats ---
    def instances(
        self, *, study_uid: str | None = None, series_uid: str | None = None
    ) -> list[Instance]:
        with self.reading() as s:
            query = (
                select(Instance)
                .join(Series)
                .join(Study)
                .options(joinedload(Instance.series).joinedload(Series.study))
            ).order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
            if study_uid:
                query = query.where(Study.study_instance_uid == study_uid)
            if series_uid:
                query = query.where(Series.series_instance_uid == series_uid)
            return list(s.scalars(query))

    def instances_where(
        self,
        *,
        patient_ids: list[str] | None = None,
        study_uids: list[str] | None = None,
        series_uids: list[str] | None = None,
        sop_uids: list[str] | None = None,
    ) -> list[Instance]:
        """Instances named by unique keys (C-GET/C-MOVE), in study/series/number order."""
        with self.reading() as s:
            query = (
                select(Instance)
                .join(Series)
                .join(Study)
                .join(Patient)
                .options(joinedload(Instance.series).joinedload(Series.study))
                .order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
            )
            if patient_ids:
                query = query.where(Patient.patient_id.in_(patient_ids))
            if study_uids:
                query = query.where(Study.study_instance_uid.in_(study_uids))
            if series_uids:
                query = query.where(Series.series_instance_uid.in_(series_uids))
            if sop_uids:
                query = query.where(Instance.sop_instance_uid.in_(sop_uids))
            return list(s.scalars(query))

    def stats(self) -> dict[str, Any]:
        """Totals overall, per modality and per codec, computed in SQL."""
        with self.reading() as s:
            totals = s.execute(
                select(
                    func.count(Instance.id),
                    func.coalesce(func.sum(Instance.received_size), 0),
                    func.coalesce(func.sum(Instance.stored_size), 0),
                )
            ).one()
            studies = s.scalar(select(func.count(Study.id)))
            pending = s.scalar(
                select(func.count(Instance.id)).where(Instance.state == STATE_PENDING)
            )
            parked = s.scalar(select(func.count(Instance.id)).where(Instance.state == STATE_PARKED))
            flagged = s.scalar(select(func.count(Instance.id)).where(Instance.defects.is_not(None)))

            def grouped(column: Any) -> dict[str, dict[str, Any]]:
                rows = s.execute(
                    select(
                        column,
                        func.count(Instance.id),
                        func.sum(Instance.received_size),
                        func.sum(Instance.stored_size),
                    )
                    .select_from(Instance)
                    .join(Series)
                    .group_by(column)
                    .order_by(column)
                )
                return {str(key or "-"): _totals(n, rec, sto) for key, n, rec, sto in rows}

            return {
                **_totals(*totals),
                "studies": studies,
                "pending": pending,
                "parked": parked,
                "flagged": flagged,
                "by_modality": grouped(Series.modality),
                "by_codec": grouped(Instance.codec),
            }


def _totals(count: int, received: int, stored: int) -> dict[str, Any]:
    received, stored = int(received or 0), int(stored or 0)
    return {
        "instances": int(count),
        "bytes_received": received,
        "bytes_stored": stored,
        "ratio": round(received / stored, 3) if stored else None,
    }


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL so readers never block the writer; FULL sync so a committed ack survives power loss."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
