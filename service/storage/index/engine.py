"""The index's plumbing: opening a database with a message a user can act on, SQLite's
settings on every pooled connection, and the one write transaction every job's writes go
through (the package docstring says why writes are serialised within a process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Self

from sqlalchemy import Connection, create_engine, event
from sqlalchemy import inspect as sql_inspect
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session

from compacs.service.metrics import INDEX_SECONDS
from compacs.service.storage.schema import Base, check_revision, is_empty, migrate, utcnow


class IndexUnavailable(RuntimeError):
    """The index cannot be used: its database does not answer, its driver is not installed,
    or it holds another application's tables. The message says which and what to do."""


class Conflict(Exception):
    """A compare-and-swap found the row changed: the transaction is rolled back."""


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


class Connections:
    """The engine and the write lock that every job class of the index shares (the package
    docstring says why they are one object)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.write_lock = threading.Lock()
        self._other_writers: Any = None

    @classmethod
    def open(cls, url: str, *, create: bool = False, check: str | None = "the index") -> Self:
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
        """The same, as an ORM session: for tests and one-off repairs that change rows by
        hand. The node's own writes are Core statements (the package docstring's rule)."""
        with self._write() as conn, Session(bind=conn, expire_on_commit=False) as s:
            yield s
            s.flush()

    def _rows(self, statement: Any) -> list[Any]:
        """The rows of one Core read, its pooled connection given back before they are used."""
        with self.engine.connect() as conn:
            return list(conn.execute(statement))

    def reading(self) -> Session:
        """An ORM session for reads that hand mapped rows (Instance with its blob, series and
        study) to callers; they stay usable after it closes."""
        return Session(self.engine, expire_on_commit=False)


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
    """When a claim taken now for `seconds` runs out."""
    return utcnow() + timedelta(seconds=seconds)
