"""The index's tables, and the Alembic migrations that own them.

SQLAlchemy 2 with portable types only, so the same code runs on SQLite (the embedded
default, WAL) and PostgreSQL (at scale).

Blobs and references: a *blob* is one durable, checksummed file in the archive (a Part-10
object today, a series volume later); an *instance* points at a blob and at where it sits
in it (offset and length, and a frame range for volumes) with the checksum of that part.
So a blob holding a whole series and a single Part-10 file are the same kind of row. An
instance carries a version for compare-and-swap, and while it waits for compression the
claim of the process that compresses it (owner and lease), so several processes on one
index never do, or undo, each other's work. A blob no instance points at any more is
*released*, and deleted by a sweep after a grace period, never while a reader may still be
sending it.

Migrations run only from `compacs db upgrade`, and from `compacs serve` on an empty index;
every other command and a `serve` on an older index refuse to run, saying what to do
(`check_revision`). Several processes starting at once take an advisory lock on PostgreSQL.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATE_PENDING = "pending"  # acknowledged, durable as received, compression not yet done
STATE_STORED = "stored"  # in its final stored form
STATE_PARKED = "parked"  # compression failed [ingest] max_attempts times: kept as received

HOT_TIER = "hot"  # where received objects land; later tiers are colder
KIND_INSTANCE = "instance"  # one Part-10 object
KIND_VOLUME = "volume"  # the pixel data of many instances coded together
# What an acknowledgement is of (Acknowledgement.kind): an instance (KIND_INSTANCE), or
ACK_PATIENT = "patient"  # a PatientID (+ issuer) whose studies disagree on the patient

PATIENT_RECEIVED = "received"
PATIENT_BACKFILLED = "backfilled"
PATIENT_UNREADABLE = "unreadable"


def utcnow() -> datetime:
    return datetime.now(UTC)


def patient_identity(
    patient_id: str, issuer: str | None, name: str | None, birth_date: str | None, study_uid: str
) -> str:
    """The Patient row a study belongs to, as a fixed-length key: PatientID, issuer, name
    and birth date (trailing empty name components do not make another person: "DOE^JANE^^"
    is "DOE^JANE", PS3.5 6.2.1); without a PatientID, the study itself, so that objects
    without one never share a patient."""
    if patient_id:
        parts = ["id", patient_id, issuer or "", (name or "").rstrip("^ "), birth_date or ""]
    else:
        parts = ["study", study_uid]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def patient_conflict_subject(patient_id: str, issuer: str | None) -> str:
    """The acknowledgement subject of a PatientID (+ issuer) conflict: the two may take 64
    characters each and the subject column holds 64, so a hash of both, as patient_identity
    keys a patient row (the audit log and `compacs problems` name the PatientID itself)."""
    return hashlib.sha256("\0".join(["patient-id", patient_id, issuer or ""]).encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """One patient identity: a PatientID (+ IssuerOfPatientID) with one name and birth date.

    Studies under one PatientID that disagree on the name or the birth date get one row each
    (colliding IDs are common: "0", "ANON", outside studies), all flagged
    `patient_id_conflict`, so a PATIENT-level C-FIND answers each name with its own studies
    and never shows one patient's name on another's study. An object without a PatientID
    gets a row of its own per study: never merged with anyone. `identity` (patient_identity())
    is the unique key that says which row a study belongs to.
    """

    __tablename__ = "patient"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))  # of the latest study written
    # Another row has the same PatientID and issuer (set on all of them, kept by the index).
    patient_id_conflict: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(), index=True
    )
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """A study, with the patient attributes of its own objects (as Orthanc keeps them per
    study): a study-level C-FIND answers and matches these, never another study's."""

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
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    other_patient_ids: Mapped[str | None] = mapped_column(Text)  # backslash-joined
    # Where the patient attributes came from: PATIENT_RECEIVED (ingest), PATIENT_BACKFILLED
    # (read from a stored object by `compacs db upgrade`), PATIENT_UNREADABLE (no object of
    # it could be read: the values the old index held), NULL (an upgraded index's study
    # still waiting for the backfill).
    patient_source: Mapped[str | None] = mapped_column(String(16), index=True)
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


class Blob(Base):
    """A durable, checksummed file of the archive, and where it is."""

    __tablename__ = "blob"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The storage tier that holds it (its archive root), and its path under that root:
    # paths are made from hashes, never from peer strings.
    tier: Mapped[str] = mapped_column(String(16), default=HOT_TIER, index=True)
    path: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default=KIND_INSTANCE)
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set when the last instance pointing at it moved elsewhere; the sweep deletes the file
    # (and the row) a grace period later, so a C-GET still sending it finishes.
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    # Fixity: when the blob was last re-read and checked, and what was wrong with it.
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    fixity_error: Mapped[str | None] = mapped_column(Text)


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
    # A bounded-error result is a new instance derived from the one received: the row takes
    # the new SOP Instance UID and keeps the received one, the bound and the error measured.
    derived_from: Mapped[str | None] = mapped_column(String(64), index=True)
    lossy_bound: Mapped[int | None] = mapped_column(Integer)
    max_error: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stored_transfer_syntax: Mapped[str] = mapped_column(String(64))
    codec: Mapped[str | None] = mapped_column(String(32), index=True)
    stored_size: Mapped[int] = mapped_column(BigInteger)  # the bytes this instance accounts for
    # The reference: which blob, where in it, and the checksum of that part. While pending,
    # the blob is the object as received.
    blob_pk: Mapped[int] = mapped_column(ForeignKey("blob.id"), index=True)
    blob_offset: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    blob_length: Mapped[int] = mapped_column(BigInteger)
    frame_first: Mapped[int | None] = mapped_column(Integer)  # in a volume blob
    frame_count: Mapped[int | None] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(80))
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The process compressing it, and until when that claim holds (renewed while it lives).
    claimed_by: Mapped[str | None] = mapped_column(String(80), index=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    accessed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # retrieved
    series: Mapped[Series] = relationship(back_populates="instances")
    blob: Mapped[Blob] = relationship()


class AuditEvent(Base):
    __tablename__ = "audit_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class Acknowledgement(Base):
    """An administrator's word that a flagged or parked object, or a PatientID whose studies
    disagree on the patient, is known and may stay as it is (`compacs problems ack`), so that
    `compacs verify` passes as a health check. It holds while the problem reads as it did when
    acknowledged: a new defect, a new failure after `compacs requeue`, a new name under the
    PatientID is a new problem. The audit log keeps every acknowledgement; this table the one
    in force per subject."""

    __tablename__ = "acknowledgement"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # KIND_INSTANCE or ACK_PATIENT
    # its key: the SOP Instance UID, or patient_conflict_subject()
    subject: Mapped[str] = mapped_column(String(64))
    problem: Mapped[str] = mapped_column(Text)  # the problem as it read when acknowledged
    acknowledged_by: Mapped[str] = mapped_column(String(80))
    acknowledged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("kind", "subject", name="uq_acknowledgement_subject"),)


# C-FIND at scale (revision 0009): PN keys match case-folded (query._text_match), served by
# an index on lower(patient_name), text_pattern_ops on PostgreSQL for LIKE prefixes; a
# study's series are read by (study_pk, modality, instance_count) alone, index-only.
for _table in (Study, Patient):
    _lowered = func.lower(_table.patient_name).label(f"{_table.__tablename__}_name_lower")
    Index(
        f"ix_{_table.__tablename__}_patient_name_lower",
        _lowered,
        postgresql_ops={_lowered.name: "text_pattern_ops"},
    )
Index("ix_series_study_modality_count", Series.study_pk, Series.modality, Series.instance_count)


# --------------------------------------------------------------------------- migrations

_ADVISORY_LOCK = 0x636F6D7061  # "compa": one schema change at a time on a shared index


class IndexOutOfDate(RuntimeError):
    """The index is at another schema revision than this compacs; the message says what to
    run."""


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option(
        "script_location", str(resources.files("compacs.service.storage").joinpath("migrations"))
    )
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    """The revision the index is at; None for an empty database (no compacs tables)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_empty(engine: Engine) -> bool:
    return not inspect(engine).get_table_names()


def backfill_pending(engine: Engine) -> bool:
    """Whether studies still wait for `compacs db upgrade` to read their patient attributes
    (revision 0007: Study.patient_source)."""
    with engine.connect() as conn:
        row = conn.execute(text("SELECT 1 FROM study WHERE patient_source IS NULL LIMIT 1")).first()
    return row is not None


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default), one process at a time."""
    cfg = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def check_revision(engine: Engine, where: str) -> None:
    """Raise IndexOutOfDate unless the index is at this compacs' revision."""
    head, current = head_revision(), current_revision(engine)
    if current == head:
        if backfill_pending(engine):
            raise IndexOutOfDate(
                f"{where}: the patient attributes of some studies still have to be read from "
                "their objects (an upgrade past revision 0007 was stopped); run "
                "`compacs db upgrade` with the same --config/--data to finish it"
            )
        return
    if current is None:
        raise IndexOutOfDate(
            f"{where}: the index has no compacs schema; start `compacs serve` once, or run "
            "`compacs db upgrade` with the same --config/--data"
        )
    raise IndexOutOfDate(
        f"{where}: the index is at schema revision {current}, this compacs needs {head}; "
        "back it up, then run `compacs db upgrade` with the same --config/--data"
    )
