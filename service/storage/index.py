"""The SQL index: what the archive holds, where each instance's bytes are, and who is
compressing what (schema.py has the tables and why they look as they do).

Several processes may share one index (PostgreSQL; SQLite on one machine): every change
that others may race is a compare-and-swap (an instance's version, a claim's owner), a
conditional update, or an insert whose unique-key conflict is taken as "someone else was
first". Within one process, writes go through a lock: on SQLite that avoids the 3-25 ms
lock waits measured with concurrent writers. SQLite write transactions begin IMMEDIATE, so
that a transaction never has to upgrade a read snapshot another process has outdated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pydicom.multival import MultiValue
from sqlalchemy import (
    Connection,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import inspect as sql_inspect
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.sql.elements import ColumnElement

from compacs.service.metrics import INDEX_SECONDS
from compacs.service.storage.schema import (
    ACK_PATIENT,
    KIND_INSTANCE,
    PATIENT_BACKFILLED,
    PATIENT_RECEIVED,
    PATIENT_UNREADABLE,
    STATE_PARKED,
    STATE_PENDING,
    STATE_STORED,
    Acknowledgement,
    AuditEvent,
    Base,
    Blob,
    Instance,
    Patient,
    Series,
    Study,
    check_revision,
    is_empty,
    migrate,
    patient_conflict_subject,
    patient_identity,
    utcnow,
)

__all__ = ["Index", "Instance", "Patient", "Series", "Study", "Blob"]


class ReceivedVersion(NamedTuple):
    """What is held for a SOP Instance UID, to tell a re-send from a new object."""

    instance_id: int
    version: int
    received_hash: str | None
    received_transfer_syntax: str
    blob_pk: int


@dataclass(frozen=True)
class NewBlob:
    """A blob just written durably, to be indexed."""

    path: str
    size: int
    checksum: str
    tier: str = "hot"
    kind: str = KIND_INSTANCE


class Claim(NamedTuple):
    """A pending instance this process compresses: what the job needs, and the version the
    result must still find."""

    instance_id: int
    sop_instance_uid: str
    version: int
    blob_path: str
    checksum: str
    calling_ae: str | None
    study_instance_uid: str
    series_instance_uid: str


class Acknowledged(NamedTuple):
    """Who acknowledged a problem, when, and what they noted."""

    by: str
    at: datetime
    note: str | None


class Problem(NamedTuple):
    """An instance an administrator should hear of: flagged defects, or parked."""

    sop_instance_uid: str
    blob_path: str
    state: str
    defects: str | None
    last_error: str | None
    study_instance_uid: str = ""
    attempts: int = 0
    # the acknowledgement in force: None when there is none, or the problem changed since
    acknowledged: Acknowledged | None = None

    @property
    def text(self) -> str:
        """The problem in one line, as acknowledgements record it."""
        parts = [f"parked: {self.last_error}"] if self.state == STATE_PARKED else []
        if self.defects:
            parts.append(f"flagged: {self.defects}")
        return "; ".join(parts)


class PatientConflict(NamedTuple):
    """One name (and birth date) under a PatientID that has others: verify lists them."""

    patient_id: str
    issuer_of_patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    studies: int
    a_study: str  # one of its Study Instance UIDs, to look it up


class PatientProblem(NamedTuple):
    """A PatientID (+ issuer) whose studies disagree on the name or birth date, as
    `compacs problems` lists it and `compacs problems ack --patient` acknowledges it: one
    problem however many names it has."""

    patient_id: str
    issuer_of_patient_id: str | None
    names: tuple[PatientConflict, ...]  # one per name and birth date, as verify lists them
    # the acknowledgement in force: None when there is none, or a name came or went since
    acknowledged: Acknowledged | None = None

    @property
    def text(self) -> str:
        """The names and birth dates, as acknowledgements record it. Not the study counts: a
        new study of a name already known is no new conflict, a new name is."""
        names = (f"{_name(c)} born {c.patient_birth_date or '(none)'}" for c in self.names)
        return "; ".join(sorted(names))

    @property
    def reason(self) -> str:
        """The conflict in one line, with each name's studies (and one of them to look up)."""
        return f"{len(self.names)} patients under one PatientID: " + "; ".join(
            f"{_name(c)} born {c.patient_birth_date or '(none)'}, {c.studies} "
            f"{'study' if c.studies == 1 else 'studies'} (e.g. {c.a_study})"
            for c in sorted(self.names, key=lambda c: (_name(c), c.patient_birth_date or ""))
        )


def _name(conflict: PatientConflict) -> str:
    """A patient name as a conflict reads it: trailing empty components make no other person
    (schema.patient_identity), and a missing name is said so."""
    name = (conflict.patient_name or "").rstrip("^ ")
    return repr(name) if name else "(no name)"


class DuplicateInstance(Exception):
    """Another association or process indexed this SOP Instance UID first."""


_COUNT_INSTANCE = (  # built once: add_received runs it for every instance
    update(Series)
    .where(Series.id == bindparam("pk"))
    .values(instance_count=Series.instance_count + 1)
)
_INSTANCE = Instance.__table__
_BLOB = Blob.__table__
_STUDY = Study.__table__
_PATIENT = Patient.__table__


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


def _blob_values(blob: NewBlob) -> dict[str, Any]:
    return {
        "tier": blob.tier,
        "path": blob.path,
        "kind": blob.kind,
        "size": blob.size,
        "checksum": blob.checksum,
        "created_at": utcnow(),
    }


class IndexUnavailable(RuntimeError):
    """The index cannot be used: its database does not answer, its driver is not installed,
    or it holds another application's tables. The message says which and what to do."""


def open_engine(url: str, where: str, node_settings: bool = True) -> Any:
    """An engine for `url` that has connected once, so that what a user can get wrong (a
    database that is down, a missing driver, a URL that is not one) is one IndexUnavailable
    naming `where` (e.g. "compacs.toml: index postgresql+psycopg://u:***@db/pacs"), not a
    traceback from deep inside SQLAlchemy; and that is empty or holds compacs' tables.
    `node_settings=False` leaves SQLite's connections as the driver makes them (`db upgrade`:
    Alembic's batch migrations copy tables, which foreign_keys=ON would refuse)."""
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise IndexUnavailable(
            f"{where}: not a database URL compacs can open ({exc}); give sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DATABASE"
        ) from exc
    except ModuleNotFoundError as exc:  # the dialect's driver
        hint = "pip install 'compacs[postgres]'"
        if exc.name == "psycopg2":
            hint += ", and write the URL as postgresql+psycopg://... (psycopg 3)"
        raise IndexUnavailable(f"{where}: needs the database driver {exc.name}: {hint}") from exc
    if node_settings and engine.dialect.name == "sqlite":
        # before the first connection, which the pool keeps: each one must be in WAL with
        # the busy timeout, or a writer holding the index fails it at once
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    try:
        tables = set(sql_inspect(engine).get_table_names())
    except DBAPIError as exc:
        engine.dispose()
        raise IndexUnavailable(f"{where}: {_unreachable(engine, exc)}") from exc
    ours = set(Base.metadata.tables)
    if tables and not tables & ours:
        engine.dispose()
        shown = ", ".join(sorted(tables)[:8]) + (", ..." if len(tables) > 8 else "")
        raise IndexUnavailable(
            f"{where}: the database holds {len(tables)} table(s) that are not compacs' "
            f"({shown}): it belongs to something else. Give compacs an empty database of its "
            "own ([node] index_url or COMPACS_INDEX_URL; empty: SQLite in the data folder)"
        )
    return engine


def _unreachable(engine: Any, exc: DBAPIError) -> str:
    """The driver's first line, and what to check."""
    first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
    if engine.dialect.name == "sqlite":
        return (
            f"cannot open the SQLite file {engine.url.database}: {first}; check that its "
            "folder exists and this user can write it"
        )
    return (
        f"cannot connect to the database: {first}; check that the database server runs and "
        "that the URL's host, port, user and database are right"
    )


class Index:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.write_lock = threading.Lock()
        self._series_pks: dict[str, int] = {}  # series UID -> row id; rows are never deleted
        self._other_writers: Any = None

    @classmethod
    def open(cls, url: str, *, create: bool = False, check: str | None = "the index") -> Index:
        """Open the index. `create`: give an empty database the schema (`compacs serve`,
        tests); unless `check` is None, refuse an index at another schema revision
        (schema.check_revision says what to run). A database that cannot be reached, or
        that holds another application's tables, raises IndexUnavailable."""
        engine = open_engine(url, check or "the index")
        try:
            if create and is_empty(engine):
                migrate(engine)
            if check is not None:
                check_revision(engine, check)
        except Exception:
            engine.dispose()
            raise
        return cls(engine)

    def engine_for_other_writers(self) -> Any:
        """An engine for code that writes the index through its own SQL (APScheduler's job
        store). On SQLite every transaction of it begins IMMEDIATE: a deferred one that reads
        and then writes while the node is writing (a CREATE TABLE after its existence check,
        during ingest) gets "database is locked" at once in WAL mode instead of waiting for the
        busy timeout, which stopped `compacs serve` at start. Other databases: the index's."""
        if self.engine.dialect.name != "sqlite":
            return self.engine
        if self._other_writers is None:
            engine = create_engine(self.engine.url, pool_pre_ping=True)
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            self._other_writers = engine
        return self._other_writers

    def close(self) -> None:
        if self._other_writers is not None:
            self._other_writers.dispose()
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One serialised write transaction (IMMEDIATE on SQLite), committed on success;
        its time, lock wait included, is compacs_index_seconds (metrics.py)."""
        with INDEX_SECONDS.time(), self.write_lock, self.engine.connect() as conn:
            conn.info["immediate"] = True
            with conn.begin():
                yield conn

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """The same, as an ORM session."""
        with self._write() as conn, Session(bind=conn, expire_on_commit=False) as s:
            yield s
            s.flush()

    def reading(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # --- ingest (hot path: SQLAlchemy Core, cached parent rows; the ORM cost more CPU per
    # image than receiving it did, measured with py-spy) ---
    def received_version(self, sop_uid: str) -> ReceivedVersion | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    _INSTANCE.c.id,
                    _INSTANCE.c.version,
                    _INSTANCE.c.received_hash,
                    _INSTANCE.c.received_transfer_syntax,
                    _INSTANCE.c.blob_pk,
                ).where(
                    (_INSTANCE.c.sop_instance_uid == sop_uid)
                    | (_INSTANCE.c.derived_from == sop_uid)
                )
            ).first()
        return ReceivedVersion(*row) if row else None

    def add_received(
        self, ds: Any, blob: NewBlob, owner: str | None, lease_until: datetime | None, **fields: Any
    ) -> int:
        """Index a newly received object and its blob, claimed by `owner` while pending;
        raises DuplicateInstance when its SOP Instance UID was indexed meanwhile."""
        series_uid = _uid(ds, "SeriesInstanceUID")
        try:
            with self._write() as conn:
                series_pk = self._series_pks.get(series_uid)
                if series_pk is None:
                    series_pk = self._series_for(conn, ds)
                blob_pk = conn.execute(
                    insert(_BLOB).values(**_blob_values(blob))
                ).inserted_primary_key[0]
                values = {
                    "state": STATE_PENDING,
                    **_instance_values(ds),
                    "series_pk": series_pk,
                    "blob_pk": blob_pk,
                    "blob_offset": 0,
                    "blob_length": blob.size,
                    "checksum": blob.checksum,
                    "claimed_by": owner,
                    "lease_until": lease_until,
                    **fields,
                }
                instance_pk = conn.execute(insert(_INSTANCE).values(**values)).inserted_primary_key[
                    0
                ]
                conn.execute(_COUNT_INSTANCE, {"pk": series_pk})
        except IntegrityError as exc:
            if self.received_version(_uid(ds, "SOPInstanceUID")) is not None:
                raise DuplicateInstance(str(exc.orig)) from exc
            raise
        self._series_pks[series_uid] = series_pk
        return instance_pk

    def replace_received(
        self,
        ds: Any,
        expected: ReceivedVersion,
        blob: NewBlob,
        owner: str | None,
        lease_until: datetime | None,
        **fields: Any,
    ) -> bool:
        """Point an existing instance at a newly received version (on_duplicate = replace);
        False if it changed since `expected` was read. The version's patient, study and
        series values replace the index's, and an instance re-sent under another study or
        series moves there (its counters follow). The old blob is released, not deleted."""
        try:
            self._replace(ds, expected, blob, owner, lease_until, fields)
        except _Conflict:
            return False
        self._series_pks.clear()  # a series may have moved to another study
        return True

    def _replace(
        self,
        ds: Any,
        expected: ReceivedVersion,
        blob: NewBlob,
        owner: str | None,
        lease_until: datetime | None,
        fields: dict[str, Any],
    ) -> None:
        with self._write() as conn:
            series_pk = self._series_for(conn, ds, update=True)
            blob_pk = conn.execute(insert(_BLOB).values(**_blob_values(blob))).inserted_primary_key[
                0
            ]
            old_series = conn.execute(
                select(_INSTANCE.c.series_pk).where(_INSTANCE.c.id == expected.instance_id)
            ).scalar()
            changed = conn.execute(
                _INSTANCE.update()
                .where(
                    _INSTANCE.c.id == expected.instance_id, _INSTANCE.c.version == expected.version
                )
                .values(
                    {
                        "state": STATE_PENDING,
                        "codec": None,
                        "stored_at": None,
                        "attempts": 0,
                        "last_error": None,
                        **_instance_values(ds),
                        **fields,
                        "series_pk": series_pk,
                        "blob_pk": blob_pk,
                        "blob_offset": 0,
                        "blob_length": blob.size,
                        "frame_first": None,
                        "frame_count": None,
                        "checksum": blob.checksum,
                        "claimed_by": owner,
                        "lease_until": lease_until,
                        "version": expected.version + 1,
                    }
                )
            ).rowcount
            if changed != 1:
                raise _Conflict  # rolls back the blob row too
            if old_series != series_pk:
                conn.execute(
                    update(Series)
                    .where(Series.id == old_series)
                    .values(instance_count=Series.instance_count - 1)
                )
                conn.execute(_COUNT_INSTANCE, {"pk": series_pk})
            _release_if_unreferenced(conn, expected.blob_pk)

    def mark_stored(
        self, claim: Claim, owner: str, blob: NewBlob, *, flag: str | None = None, **fields: Any
    ) -> bool:
        """Record the compressed form in its new blob; False (nothing changed) if this process
        no longer holds the claim at that version (replaced, or taken over after its lease
        ran out). The received blob is released. `flag`: a defect found by the job (pixels
        that do not decode), added to those ingest found."""
        if flag:
            fields["defects"] = func.coalesce(_INSTANCE.c.defects + "; ", "") + flag
        try:
            self._mark_stored(claim, owner, blob, fields)
        except _Conflict:
            return False
        return True

    def _mark_stored(self, claim: Claim, owner: str, blob: NewBlob, fields: dict[str, Any]) -> None:
        with self._write() as conn:
            old_blob = conn.execute(
                select(_INSTANCE.c.blob_pk).where(_INSTANCE.c.id == claim.instance_id)
            ).scalar()
            blob_pk = conn.execute(insert(_BLOB).values(**_blob_values(blob))).inserted_primary_key[
                0
            ]
            changed = conn.execute(
                _INSTANCE.update()
                .where(*_held(claim, owner))
                .values(
                    state=STATE_STORED,
                    stored_at=utcnow(),
                    blob_pk=blob_pk,
                    blob_offset=0,
                    blob_length=blob.size,
                    checksum=blob.checksum,
                    stored_size=blob.size,
                    claimed_by=None,
                    lease_until=None,
                    version=claim.version + 1,
                    **fields,
                )
            ).rowcount
            if changed != 1:
                raise _Conflict
            _release_if_unreferenced(conn, old_blob)

    def record_failure(self, claim: Claim, owner: str, error: str, max_attempts: int) -> str | None:
        """Count a failed compression attempt: the state afterwards (pending, or parked after
        `max_attempts`: the claim ends), or None if this process no longer holds the claim."""
        with self._write() as conn:
            attempts = conn.execute(
                select(_INSTANCE.c.attempts).where(*_held(claim, owner))
            ).scalar()
            if attempts is None:
                return None
            parked = attempts + 1 >= max_attempts
            conn.execute(
                _INSTANCE.update()
                .where(*_held(claim, owner))
                .values(
                    attempts=attempts + 1,
                    last_error=error[:2000],
                    state=STATE_PARKED if parked else STATE_PENDING,
                    **({"claimed_by": None, "lease_until": None} if parked else {}),
                )
            )
            return STATE_PARKED if parked else STATE_PENDING

    def still_claimed(self, claim: Claim, owner: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(select(_INSTANCE.c.id).where(*_held(claim, owner))).first() is not None
            )

    # --- claims: which process compresses which pending instance ---
    def claim_pending(
        self, owner: str, lease_until: datetime, limit: int = 500, *, own_too: bool = False
    ) -> list[Claim]:
        """Claim pending instances nobody holds (never claimed, or their lease ran out: the
        process died), oldest first; with `own_too` also those this owner name holds (a
        restart: owner names are host and port, so the holder was this node's previous
        life). SKIP LOCKED on PostgreSQL: two processes claiming at once get different rows;
        SQLite has one writer."""
        now = utcnow()
        holder = _INSTANCE.c.claimed_by.is_(None) | (_INSTANCE.c.lease_until < now)
        if own_too:
            holder = holder | (_INSTANCE.c.claimed_by == owner)
        free = (_INSTANCE.c.state == STATE_PENDING) & holder
        pick = select(_INSTANCE.c.id).where(free).order_by(_INSTANCE.c.id).limit(limit)
        if self.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        with self._write() as conn:
            ids = [row[0] for row in conn.execute(pick)]
            if not ids:
                return []
            claimed = [
                row[0]
                for row in conn.execute(
                    _INSTANCE.update()
                    .where(_INSTANCE.c.id.in_(ids), free)
                    .values(claimed_by=owner, lease_until=lease_until)
                    .returning(_INSTANCE.c.id)
                )
            ]
            return self._claims(conn, claimed)

    def renew_claims(self, owner: str, lease_until: datetime) -> int:
        """Extend this process' claims: it is alive."""
        with self._write() as conn:
            return conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.claimed_by == owner, _INSTANCE.c.state == STATE_PENDING)
                .values(lease_until=lease_until)
            ).rowcount

    def release_claims(self, owner: str) -> int:
        """At a clean stop: let any process take this one's pending instances at once."""
        with self._write() as conn:
            return conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.claimed_by == owner, _INSTANCE.c.state == STATE_PENDING)
                .values(claimed_by=None, lease_until=None)
            ).rowcount

    def _claims(self, conn: Connection, ids: list[int]) -> list[Claim]:
        if not ids:
            return []
        rows = conn.execute(
            select(
                _INSTANCE.c.id,
                _INSTANCE.c.sop_instance_uid,
                _INSTANCE.c.version,
                Blob.path,
                _INSTANCE.c.checksum,
                _INSTANCE.c.calling_ae,
                Study.study_instance_uid,
                Series.series_instance_uid,
            )
            .select_from(
                _INSTANCE.join(Blob.__table__).join(Series.__table__).join(Study.__table__)
            )
            .where(_INSTANCE.c.id.in_(ids))
            .order_by(_INSTANCE.c.id)
        )
        return [Claim(*row) for row in rows]

    # --- tier moves: stored instances, claimed while they move ---
    def tier_candidates(self, after_id: int, limit: int) -> list[Any]:
        """Stored instances nobody moves, in id order from `after_id`, with what a tier policy
        and a move need to know of them."""
        now = utcnow()
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        _INSTANCE.c.id,
                        _INSTANCE.c.version,
                        _INSTANCE.c.sop_instance_uid,
                        Study.study_instance_uid,
                        Series.series_instance_uid,
                        _INSTANCE.c.series_pk,
                        Series.modality,
                        _INSTANCE.c.sop_class_uid,
                        _INSTANCE.c.calling_ae,
                        _INSTANCE.c.bits_stored,
                        _INSTANCE.c.number_of_frames,
                        _INSTANCE.c.rows,
                        _INSTANCE.c.columns,
                        _INSTANCE.c.received_at,
                        _INSTANCE.c.accessed_at,
                        Blob.tier,
                        Blob.kind,
                        Blob.path,
                        _INSTANCE.c.blob_offset,
                        _INSTANCE.c.blob_length,
                        _INSTANCE.c.checksum,
                        _INSTANCE.c.frame_first,
                        _INSTANCE.c.codec,
                        _INSTANCE.c.stored_transfer_syntax,
                        _INSTANCE.c.stored_size,
                    )
                    .select_from(
                        _INSTANCE.join(Blob.__table__).join(Series.__table__).join(Study.__table__)
                    )
                    .where(
                        _INSTANCE.c.id > after_id,
                        _INSTANCE.c.state == STATE_STORED,
                        _INSTANCE.c.claimed_by.is_(None) | (_INSTANCE.c.lease_until < now),
                    )
                    .order_by(_INSTANCE.c.id)
                    .limit(limit)
                ).mappings()
            )

    def series_instances(self, series_pks: list[int]) -> dict[int, tuple[int, int, datetime]]:
        """Per series: instances, how many of them are stored, and the last one's arrival."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    _INSTANCE.c.series_pk,
                    func.count(_INSTANCE.c.id),
                    func.sum(case((_INSTANCE.c.state == STATE_STORED, 1), else_=0)),
                    func.max(_INSTANCE.c.received_at),
                )
                .where(_INSTANCE.c.series_pk.in_(series_pks))
                .group_by(_INSTANCE.c.series_pk)
            )
            return {pk: (n, int(stored or 0), last) for pk, n, stored, last in rows}

    def claim_stored(
        self, wanted: list[tuple[int, int]], owner: str, lease_until: datetime
    ) -> set[int]:
        """Claim stored instances (id, version) to move them; the ids claimed."""
        now = utcnow()
        claimed: set[int] = set()
        with self._write() as conn:
            for instance_id, version in wanted:
                changed = conn.execute(
                    _INSTANCE.update()
                    .where(
                        _INSTANCE.c.id == instance_id,
                        _INSTANCE.c.version == version,
                        _INSTANCE.c.state == STATE_STORED,
                        _INSTANCE.c.claimed_by.is_(None) | (_INSTANCE.c.lease_until < now),
                    )
                    .values(claimed_by=owner, lease_until=lease_until)
                ).rowcount
                if changed:
                    claimed.add(instance_id)
        return claimed

    def renew_move_claims(self, ids: list[int], owner: str, lease_until: datetime) -> None:
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id.in_(ids), _INSTANCE.c.claimed_by == owner)
                .values(lease_until=lease_until)
            )

    def unclaim(self, ids: list[int], owner: str) -> None:
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id.in_(ids), _INSTANCE.c.claimed_by == owner)
                .values(claimed_by=None, lease_until=None)
            )

    def commit_move(self, owner: str, tier: str, blobs: list[NewBlob], placed: list[Any]) -> bool:
        """Point the moved instances at their new blobs on `tier`, all in one transaction,
        each only if still at the version it was claimed at by `owner`; the old blobs are
        released. False (nothing changed) if any of them changed meanwhile."""
        try:
            with self._write() as conn:
                pks = [
                    conn.execute(insert(_BLOB).values(**_blob_values(b))).inserted_primary_key[0]
                    for b in blobs
                ]
                old = set()
                for p in placed:
                    held = (
                        _INSTANCE.c.id == p.instance_id,
                        _INSTANCE.c.version == p.version,
                        _INSTANCE.c.state == STATE_STORED,
                        _INSTANCE.c.claimed_by == owner,
                    )
                    before = conn.execute(select(_INSTANCE.c.blob_pk).where(*held)).scalar()
                    if before is None:
                        raise _Conflict
                    old.add(before)
                    conn.execute(
                        _INSTANCE.update()
                        .where(*held)
                        .values(
                            blob_pk=pks[p.blob],
                            blob_offset=p.offset,
                            blob_length=p.length,
                            checksum=p.checksum,
                            frame_first=p.frame_first,
                            frame_count=None if p.frame_first is None else 1,
                            stored_size=p.stored_size,
                            stored_transfer_syntax=p.transfer_syntax,
                            codec=p.codec,
                            claimed_by=None,
                            lease_until=None,
                            version=p.version + 1,
                        )
                    )
                for blob_pk in old:
                    _release_if_unreferenced(conn, blob_pk)
        except _Conflict:
            return False
        return True

    def record_fixity(self, blob_pk: int, error: str | None) -> None:
        with self._write() as conn:
            conn.execute(
                _BLOB.update()
                .where(_BLOB.c.id == blob_pk)
                .values(verified_at=utcnow(), fixity_error=error)
            )

    def fixity_due(self, before: datetime, limit: int) -> list[tuple[int, str, str, str, str]]:
        """Blobs (id, tier, path, checksum, kind) held and not checked since `before`."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_BLOB.c.id, _BLOB.c.tier, _BLOB.c.path, _BLOB.c.checksum, _BLOB.c.kind)
                .where(
                    _BLOB.c.released_at.is_(None),
                    _BLOB.c.verified_at.is_(None) | (_BLOB.c.verified_at < before),
                )
                .order_by(_BLOB.c.verified_at.is_not(None), _BLOB.c.verified_at, _BLOB.c.id)
                .limit(limit)
            )
            return [tuple(row) for row in rows]

    def fixity_summary(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            held = _BLOB.c.released_at.is_(None)
            total, checked, failed, oldest = conn.execute(
                select(
                    func.count(_BLOB.c.id),
                    func.count(_BLOB.c.verified_at),
                    func.count(_BLOB.c.fixity_error),
                    func.min(_BLOB.c.verified_at),
                ).where(held)
            ).one()
        return {"blobs": total, "checked": checked, "failed": failed, "oldest_check": oldest}

    # --- blobs ---
    def blob_paths(self) -> set[str]:
        """Every blob the index knows, released ones included: a file that is not among them
        and older than any job in flight is an orphan."""
        with self.engine.connect() as conn:
            return {path for (path,) in conn.execute(select(_BLOB.c.path))}

    def released_blobs(self, before: datetime) -> list[tuple[int, str, str]]:
        """Blobs (id, tier, path) released before `before` that no instance points at: safe
        to delete."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_BLOB.c.id, _BLOB.c.tier, _BLOB.c.path).where(
                    _BLOB.c.released_at < before,
                    ~select(_INSTANCE.c.id).where(_INSTANCE.c.blob_pk == _BLOB.c.id).exists(),
                )
            )
            return [tuple(row) for row in rows]

    def fixity_failures(self) -> list[tuple[str, str, str]]:
        """Blobs (tier, path, error) whose last fixity check failed."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_BLOB.c.tier, _BLOB.c.path, _BLOB.c.fixity_error)
                .where(_BLOB.c.fixity_error.is_not(None), _BLOB.c.released_at.is_(None))
                .order_by(_BLOB.c.id)
            )
            return [tuple(row) for row in rows]

    def mark_accessed(self, instance_ids: list[int]) -> None:
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id.in_(instance_ids))
                .values(accessed_at=utcnow())
            )

    def forget_blob(self, blob_pk: int) -> None:
        """Drop the row of a released blob whose file the sweep has deleted."""
        with self._write() as conn:
            conn.execute(
                _BLOB.delete().where(_BLOB.c.id == blob_pk, _BLOB.c.released_at.is_not(None))
            )

    # --- reading ---
    def instance(self, instance_pk: int) -> Instance | None:
        """One instance, read afresh (a reader whose blob was gone looks again)."""
        with self.reading() as s:
            return s.scalar(
                select(Instance)
                .options(
                    joinedload(Instance.blob), joinedload(Instance.series).joinedload(Series.study)
                )
                .where(Instance.id == instance_pk)
            )

    # --- problems: flagged and parked instances, acknowledged or re-queued ---
    def problems(self) -> list[Problem]:
        """Flagged and parked instances with the acknowledgement in force on each (verify,
        `compacs problems`)."""
        ack = Acknowledgement.__table__
        with self.reading() as s:
            rows = s.execute(
                select(
                    Instance.sop_instance_uid,
                    Blob.path,
                    Instance.state,
                    Instance.defects,
                    Instance.last_error,
                    Study.study_instance_uid,
                    Instance.attempts,
                    ack.c.problem,
                    ack.c.acknowledged_by,
                    ack.c.acknowledged_at,
                    ack.c.note,
                )
                .select_from(Instance)
                .join(Blob)
                .join(Series)
                .join(Study)
                .outerjoin(
                    ack,
                    (ack.c.kind == KIND_INSTANCE) & (ack.c.subject == Instance.sop_instance_uid),
                )
                .where((Instance.defects.is_not(None)) | (Instance.state == STATE_PARKED))
                .order_by(Instance.id)
            )
            problems = []
            for *fields, acked_text, by, at, note in rows:
                problem = Problem(*fields)
                if acked_text is not None and acked_text == problem.text:
                    problem = problem._replace(acknowledged=Acknowledged(by, at, note))
                problems.append(problem)
            return problems

    def add_flag(self, instance_pk: int, defect: str) -> None:
        """Flag an instance found non-conformant after ingest (verify, on an index older than
        the flagging of undecodable arrivals), its defect added to any it has."""
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id == instance_pk)
                .values(defects=func.coalesce(_INSTANCE.c.defects + "; ", "") + defect)
            )

    def kept_undecodable(self, blob_pk: int) -> bool:
        """Whether the blob holds an instance kept as received and flagged: its pixels not
        decoding is then a known defect of what was received, not damage (fixity)."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(_INSTANCE.c.id).where(
                        _INSTANCE.c.blob_pk == blob_pk,
                        _INSTANCE.c.defects.is_not(None),
                        _INSTANCE.c.codec == "passthrough",
                    )
                ).first()
                is not None
            )

    def acknowledge(
        self, problems: Sequence[Problem | PatientProblem], by: str, note: str | None
    ) -> None:
        """Record that `by` knows these problems as they read now; audited one by one."""
        ack = Acknowledgement.__table__
        now = utcnow()
        with self._write() as conn:
            for problem in problems:
                if isinstance(problem, PatientProblem):
                    kind, sop_uid = ACK_PATIENT, None
                    subject = patient_conflict_subject(
                        problem.patient_id, problem.issuer_of_patient_id
                    )
                    what = f"{patient_label(problem)}: {problem.reason}"
                else:
                    kind, sop_uid = KIND_INSTANCE, problem.sop_instance_uid
                    subject, what = problem.sop_instance_uid, problem.text
                conn.execute(ack.delete().where((ack.c.kind == kind) & (ack.c.subject == subject)))
                conn.execute(
                    insert(ack).values(
                        kind=kind,
                        subject=subject,
                        problem=problem.text,
                        acknowledged_by=by[:80],
                        acknowledged_at=now,
                        note=note,
                    )
                )
                conn.execute(
                    insert(AuditEvent.__table__).values(
                        at=now,
                        kind="acknowledged",
                        sop_instance_uid=sop_uid,
                        detail=f"by {by}: {what}" + (f" (note: {note})" if note else ""),
                    )
                )

    def requeue(self, sop_uids: list[str], by: str) -> int:
        """Send parked instances back to pending with no attempts counted and no claim, so a
        node takes them at its next recovery pass (or start); their acknowledgements end
        with the problem. The version moves on: a parked row has no job whose late result
        could still land, but compare-and-swap never relies on that."""
        ack = Acknowledgement.__table__
        now = utcnow()
        parked = (_INSTANCE.c.state == STATE_PARKED) & _INSTANCE.c.sop_instance_uid.in_(
            bindparam("uids", expanding=True)
        )
        with self._write() as conn:
            requeued = [
                row[0]
                for row in conn.execute(
                    _INSTANCE.update()
                    .where(parked)
                    .values(
                        state=STATE_PENDING,
                        attempts=0,
                        last_error=None,
                        claimed_by=None,
                        lease_until=None,
                        version=_INSTANCE.c.version + 1,
                    )
                    .returning(_INSTANCE.c.sop_instance_uid),
                    {"uids": sop_uids},
                )
            ]
            if requeued:
                conn.execute(
                    ack.delete().where(ack.c.kind == KIND_INSTANCE, ack.c.subject.in_(requeued))
                )
                conn.execute(
                    insert(AuditEvent.__table__),
                    [
                        {"at": now, "kind": "requeued", "sop_instance_uid": uid, "detail": by}
                        for uid in requeued
                    ],
                )
            return len(requeued)

    def last_audit(self, kind: str) -> str | None:
        """When and what the last audit event of `kind` said."""
        table = AuditEvent.__table__
        with self.engine.connect() as conn:
            row = conn.execute(
                select(table.c.at, table.c.detail)
                .where(table.c.kind == kind)
                .order_by(table.c.id.desc())
                .limit(1)
            ).first()
        return f"{row[0]}: {row[1]}" if row else None

    def audit(
        self,
        kind: str,
        *,
        sop_uid: str | None = None,
        calling_ae: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self._write() as conn:
            conn.execute(
                insert(AuditEvent.__table__).values(
                    at=utcnow(),
                    kind=kind,
                    sop_instance_uid=sop_uid,
                    calling_ae=calling_ae,
                    detail=detail,
                )
            )

    def _series_for(self, conn: Connection, ds: Any, update: bool = False) -> int:
        """The series row of `ds`, created with its study and patient where missing; with
        `update`, existing rows take the values of `ds` (a replaced object): its study's
        patient attributes change, no other study's."""
        study = _study_for(conn, ds, update)
        return _upsert(
            conn,
            Series,
            "series_instance_uid",
            _uid(ds, "SeriesInstanceUID"),
            {
                "study_pk": study,
                "modality": _text(ds, "Modality", 16),
                "series_number": _int(ds, "SeriesNumber"),
                "series_description": _text(ds, "SeriesDescription"),
                "body_part_examined": _text(ds, "BodyPartExamined", 64),
            },
            update,
        )

    # --- patients (schema.Patient says how studies are grouped) ---
    def studies_to_backfill(self, limit: int) -> list[tuple[int, str]]:
        """Studies (id, Study Instance UID) of an upgraded index whose patient attributes
        still wait for `compacs db upgrade` to read them from a stored object."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_STUDY.c.id, _STUDY.c.study_instance_uid)
                .where(_STUDY.c.patient_source.is_(None))
                .order_by(_STUDY.c.id)
                .limit(limit)
            )
            return [tuple(row) for row in rows]

    def backfill_pending(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(
                select(func.count(_STUDY.c.id)).where(_STUDY.c.patient_source.is_(None))
            )

    def study_header_sources(self, study_pk: int) -> list[Instance]:
        """The instances of a study to read its patient attributes from, the cheapest first
        (a Part-10 blob of its own before a slice of a series volume, then the smallest)."""
        with self.reading() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .join(Series)
                    .options(joinedload(Instance.blob))
                    .where(Series.study_pk == study_pk)
                    .order_by(Instance.frame_first.is_not(None), Instance.blob_length, Instance.id)
                    .limit(3)
                )
            )

    def backfill_study(self, study_pk: int, ds: Any | None) -> bool:
        """Give an upgraded index's study the patient attributes of `ds` (one of its stored
        objects), or, with None (none could be read), mark it as keeping the old index's
        values. Only a study still waiting is changed (False otherwise), so a re-run after a
        kill, or two at once, never does one twice."""
        with self._write() as conn:
            row = conn.execute(
                select(_STUDY.c.patient_pk, _STUDY.c.study_instance_uid).where(
                    _STUDY.c.id == study_pk, _STUDY.c.patient_source.is_(None)
                )
            ).first()
            if row is None:
                return False
            if ds is None:
                conn.execute(
                    _STUDY.update()
                    .where(_STUDY.c.id == study_pk)
                    .values(patient_source=PATIENT_UNREADABLE)
                )
                return True
            patient = _patient_values(ds)
            patient_pk = _patient_for(conn, patient, row.study_instance_uid)
            conn.execute(
                _STUDY.update()
                .where(_STUDY.c.id == study_pk)
                .values(
                    patient_pk=patient_pk,
                    **_study_patient_values(patient),
                    patient_source=PATIENT_BACKFILLED,
                )
            )
            if patient_pk != row.patient_pk:
                _leave_patient(conn, row.patient_pk)
        return True

    def patient_conflicts(self) -> list[PatientConflict]:
        """PatientIDs (with issuer) whose studies disagree on the name or birth date: one entry
        per patient row, for verify."""
        with self.reading() as s:
            rows = s.execute(
                select(
                    Patient.patient_id,
                    Patient.issuer_of_patient_id,
                    Patient.patient_name,
                    Patient.patient_birth_date,
                    func.count(Study.id),
                    func.min(Study.study_instance_uid),
                )
                .join(Study, Study.patient_pk == Patient.id)
                .where(Patient.patient_id_conflict.is_(True))
                .group_by(Patient.id)
                .order_by(Patient.patient_id, Patient.issuer_of_patient_id, Patient.id)
            )
            return [PatientConflict(*row) for row in rows]

    def patient_problems(self) -> list[PatientProblem]:
        """patient_conflicts() grouped by PatientID (+ issuer), with the acknowledgement in
        force on each (verify, `compacs problems`)."""
        groups: dict[tuple[str, str | None], list[PatientConflict]] = {}
        for conflict in self.patient_conflicts():
            key = (conflict.patient_id, conflict.issuer_of_patient_id)
            groups.setdefault(key, []).append(conflict)
        ack = Acknowledgement.__table__
        with self.engine.connect() as conn:
            acks = {
                subject: (text, Acknowledged(by, at, note))
                for subject, text, by, at, note in conn.execute(
                    select(
                        ack.c.subject,
                        ack.c.problem,
                        ack.c.acknowledged_by,
                        ack.c.acknowledged_at,
                        ack.c.note,
                    ).where(ack.c.kind == ACK_PATIENT)
                )
            }
        problems = []
        for (patient_id, issuer), names in groups.items():
            problem = PatientProblem(patient_id, issuer, tuple(names))
            acked_text, acked = acks.get(patient_conflict_subject(patient_id, issuer), (None, None))
            if acked_text == problem.text:
                problem = problem._replace(acknowledged=acked)
            problems.append(problem)
        return problems

    def patient_unverified_studies(self) -> list[tuple[str, str | None, str | None]]:
        """(Study Instance UID, PatientID, PatientName) of each study whose patient attributes
        `compacs db upgrade` could not read from any of its objects (revision 0007's
        backfill): before 0007 studies under one PatientID shared one name, so these may
        answer with another study's patient. `compacs problems` lists them."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_STUDY.c.study_instance_uid, _PATIENT.c.patient_id, _STUDY.c.patient_name)
                .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
                .where(_STUDY.c.patient_source == PATIENT_UNREADABLE)
                .order_by(_STUDY.c.study_instance_uid)
            )
            return [(uid, pid or None, name) for uid, pid, name in rows]

    def instances(
        self, *, study_uid: str | None = None, series_uid: str | None = None
    ) -> list[Instance]:
        return self._instances(
            study_uids=[study_uid] if study_uid else None,
            series_uids=[series_uid] if series_uid else None,
        )

    def instances_where(
        self,
        *,
        patient_ids: list[str] | None = None,
        study_uids: list[str] | None = None,
        series_uids: list[str] | None = None,
        sop_uids: list[str] | None = None,
    ) -> list[Instance]:
        """Instances named by unique keys (C-GET/C-MOVE), in study/series/number order."""
        return self._instances(
            patient_ids=patient_ids,
            study_uids=study_uids,
            series_uids=series_uids,
            sop_uids=sop_uids,
        )

    def _instances(self, **keys: list[str] | None) -> list[Instance]:
        columns = {
            "patient_ids": Patient.patient_id,
            "study_uids": Study.study_instance_uid,
            "series_uids": Series.series_instance_uid,
            "sop_uids": Instance.sop_instance_uid,
        }
        with self.reading() as s:
            query = (
                select(Instance)
                .join(Series)
                .join(Study)
                .join(Patient)
                .options(
                    joinedload(Instance.series).joinedload(Series.study), joinedload(Instance.blob)
                )
                .order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
            )
            for key, values in keys.items():
                if values:
                    query = query.where(uid_in(columns[key], values))
            return list(s.scalars(query))

    def state_counts(self) -> dict[str, int]:
        """Pending and parked instances: read through the index on instance.state, so the
        cost grows with those rows, not with the archive (the metrics' gauges)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_INSTANCE.c.state, func.count())
                .where(_INSTANCE.c.state.in_([STATE_PENDING, STATE_PARKED]))
                .group_by(_INSTANCE.c.state)
            )
            return {state: count for state, count in rows}

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

            def count(where: Any) -> int:
                return s.scalar(select(func.count(Instance.id)).where(where))

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
                    .join(Blob)
                    .group_by(column)
                    .order_by(column)
                )
                return {str(key or "-"): _totals(n, rec, sto) for key, n, rec, sto in rows}

            return {
                **_totals(*totals),
                "studies": s.scalar(select(func.count(Study.id))),
                "pending": count(Instance.state == STATE_PENDING),
                "parked": count(Instance.state == STATE_PARKED),
                "flagged": count(Instance.defects.is_not(None)),
                # PatientIDs (with issuer) whose studies disagree on the name or birth date
                "patient_id_conflicts": s.scalar(
                    select(func.count()).select_from(
                        select(Patient.patient_id, Patient.issuer_of_patient_id)
                        .where(Patient.patient_id_conflict.is_(True))
                        .distinct()
                        .subquery()
                    )
                ),
                # studies the 0007 upgrade could not re-read: they keep the patient values
                # of the shared row they had, which may be another study's
                "patient_unverified_studies": s.scalar(
                    select(func.count(Study.id)).where(
                        Study.patient_source == PATIENT_UNREADABLE
                    )
                ),
                "by_modality": grouped(Series.modality),
                "by_codec": grouped(Instance.codec),
                "by_tier": grouped(Blob.tier),
            }


def patient_label(problem: PatientProblem) -> str:
    """How a PatientID (+ issuer) is named to an administrator."""
    issuer = problem.issuer_of_patient_id
    return f"PatientID {problem.patient_id!r}" + (f" (issuer {issuer!r})" if issuer else "")


class _Conflict(Exception):
    """A compare-and-swap found the row changed: the transaction is rolled back."""


def _held(claim: Claim, owner: str) -> tuple[Any, ...]:
    return (
        _INSTANCE.c.id == claim.instance_id,
        _INSTANCE.c.version == claim.version,
        _INSTANCE.c.state == STATE_PENDING,
        _INSTANCE.c.claimed_by == owner,
    )


def uid_in(column: Any, uids: Sequence[str]) -> ColumnElement[bool]:
    """Exact UID matching on a list of UIDs (PS3.4 C.2.2.2.2; UIDs take no wildcards, so "*"
    and "?" are plain characters that no UID has), the one way C-FIND (query.py) and
    C-GET/C-MOVE (retrieve.py) match UID keys. One IN list: one OR per UID made SQLite refuse
    2,000 UIDs ("Expression tree is too large (maximum depth 1000)"); an IN list of 40,000
    took 0.2 s here. Its limit is the driver's bound values per statement (SQLite: 32,766 by
    default, 250,000 in Debian's; PostgreSQL: 65,535), beyond what an explicit VR identifier
    can carry (64 KiB per element: about 1,000 full-length UIDs)."""
    return column.in_(list(uids))


def _release_if_unreferenced(conn: Connection, blob_pk: int | None) -> None:
    if blob_pk is None:
        return
    conn.execute(
        _BLOB.update()
        .where(
            _BLOB.c.id == blob_pk,
            ~select(_INSTANCE.c.id).where(_INSTANCE.c.blob_pk == blob_pk).exists(),
        )
        .values(released_at=utcnow())
    )


def _upsert(
    conn: Connection, model: type, key: str, value: str, values: dict[str, Any], update: bool
) -> int:
    """The id of the row whose unique `key` is `value`, inserted if missing. Another process
    may insert it between our look and our insert: the unique key says so, and we read its
    row (the savepoint keeps our transaction)."""
    table = model.__table__
    row_id = conn.execute(select(table.c.id).where(table.c[key] == value)).scalar()
    if row_id is None:
        try:
            with conn.begin_nested():
                values = {**values, key: value}
                if "created_at" in table.c:
                    values["created_at"] = utcnow()
                return conn.execute(insert(table).values(**values)).inserted_primary_key[0]
        except IntegrityError:
            row_id = conn.execute(select(table.c.id).where(table.c[key] == value)).scalar()
            if row_id is None:
                raise
    if update:
        conn.execute(table.update().where(table.c.id == row_id).values(**values))
    return row_id


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


def _patient_for(conn: Connection, patient: dict[str, Any], study_uid: str) -> int:
    """The patient row (schema.Patient) for these attributes, created when missing; a new
    row under a PatientID that already has one flags them all as a conflict."""
    identity = patient_identity(
        patient["patient_id"],
        patient["issuer_of_patient_id"],
        patient["patient_name"],
        patient["patient_birth_date"],
        study_uid,
    )
    row_id = conn.execute(select(_PATIENT.c.id).where(_PATIENT.c.identity == identity)).scalar()
    if row_id is not None:
        return row_id
    values = {k: v for k, v in patient.items() if k != "other_patient_ids"}
    try:
        with conn.begin_nested():
            row_id = conn.execute(
                insert(_PATIENT).values(**values, identity=identity)
            ).inserted_primary_key[0]
    except IntegrityError:  # another process was first
        row_id = conn.execute(select(_PATIENT.c.id).where(_PATIENT.c.identity == identity)).scalar()
        if row_id is None:
            raise
        return row_id
    _mark_conflicts(conn, patient["patient_id"], patient["issuer_of_patient_id"])
    return row_id


def _same_patient_id(patient_id: str, issuer: str | None) -> Any:
    same_issuer = (
        _PATIENT.c.issuer_of_patient_id.is_(None)
        if issuer is None
        else _PATIENT.c.issuer_of_patient_id == issuer
    )
    return (_PATIENT.c.patient_id == patient_id) & same_issuer


# pg_advisory_xact_lock's first key for patient-ID locks (schema's migration lock is a
# one-key lock: another space)
_PATIENT_LOCK_CLASS = 0x636F6D70  # "comp"


def _mark_conflicts(conn: Connection, patient_id: str, issuer: str | None) -> None:
    """Flag every row of a PatientID (+ issuer) when it has more than one (a name or birth
    date differs: schema.patient_identity), unflag a row left alone. Objects without a
    PatientID each have a row of their own: never a conflict."""
    if not patient_id:
        return
    if conn.dialect.name == "postgresql":
        # Several processes may add names under one PatientID at once, and each would count
        # only its own uncommitted row: one at a time per PatientID (+ issuer) until commit,
        # so the later count sees the earlier row (READ COMMITTED reads anew per statement).
        # SQLite serialises every writer already.
        conn.execute(
            func.pg_advisory_xact_lock(
                _PATIENT_LOCK_CLASS, func.hashtext(f"{patient_id}\\{issuer or ''}")
            )
        )
    group = _same_patient_id(patient_id, issuer)
    rows = conn.scalar(select(func.count(_PATIENT.c.id)).where(group))
    conn.execute(_PATIENT.update().where(group).values(patient_id_conflict=rows > 1))


def _leave_patient(conn: Connection, patient_pk: int) -> None:
    """A study moved to another patient row: drop the old row if no study is left on it (a
    PATIENT-level C-FIND must not answer a name nobody has any more), and re-check its
    PatientID's conflict."""
    old = conn.execute(
        select(_PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id).where(
            _PATIENT.c.id == patient_pk
        )
    ).first()
    if old is None:
        return
    left = conn.scalar(select(func.count(_STUDY.c.id)).where(_STUDY.c.patient_pk == patient_pk))
    if not left:
        conn.execute(_PATIENT.delete().where(_PATIENT.c.id == patient_pk))
    _mark_conflicts(conn, old.patient_id, old.issuer_of_patient_id)


def _study_for(conn: Connection, ds: Any, update: bool) -> int:
    """The study row of `ds`, created (with its patient row) where missing. With `update` (a
    replaced object) it takes the values of `ds`, its patient attributes included, and moves
    to the patient row they name: other studies of the old row keep theirs."""
    uid = _uid(ds, "StudyInstanceUID")
    row = conn.execute(
        select(_STUDY.c.id, _STUDY.c.patient_pk).where(_STUDY.c.study_instance_uid == uid)
    ).first()
    if row is not None and not update:
        return row.id
    patient = _patient_values(ds)
    patient_pk = _patient_for(conn, patient, uid)
    values = {
        "patient_pk": patient_pk,
        "study_date": _text(ds, "StudyDate", 8),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber", 64),
        "study_id": _text(ds, "StudyID", 64),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician_name": _text(ds, "ReferringPhysicianName"),
        **_study_patient_values(patient),
        "patient_source": PATIENT_RECEIVED,
    }
    if row is not None:
        conn.execute(_STUDY.update().where(_STUDY.c.id == row.id).values(**values))
        if row.patient_pk != patient_pk:
            _leave_patient(conn, row.patient_pk)
        return row.id
    study_pk = _upsert(conn, Study, "study_instance_uid", uid, values, False)
    # Another process inserted the study first, under its own patient row: ours may be empty.
    if conn.scalar(select(_STUDY.c.patient_pk).where(_STUDY.c.id == study_pk)) != patient_pk:
        _leave_patient(conn, patient_pk)
    return study_pk


def _joined(ds: Any, keyword: str) -> str | None:
    """A multi-valued text attribute as DICOM writes it (backslash-joined)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    text = "\\".join(str(v).strip().replace("\x00", "") for v in items)
    return text or None


def _totals(count: int, received: int, stored: int) -> dict[str, Any]:
    received, stored = int(received or 0), int(stored or 0)
    return {
        "instances": int(count),
        "bytes_received": received,
        "bytes_stored": stored,
        "ratio": round(received / stored, 3) if stored else None,
    }


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL so readers never block the writer; FULL sync so a committed ack survives power
    loss. The driver's own transaction handling is off: SQLAlchemy's "begin" event below
    says how each transaction begins."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # busy_timeout first: switching to WAL waits for a lock like any write, and without the
    # timeout a writer holding the index (ingest's group commit) fails the new connection
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.pop("immediate", False) else "BEGIN")


def lease(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)
