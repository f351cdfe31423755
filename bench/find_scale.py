"""C-FIND and ingest on a PostgreSQL index of a million instances.

Creates its own database on a PostgreSQL server (``--admin-url``, default the local one on
127.0.0.1:5432 with trust auth), gives it compacs' schema through the real migrations
(``schema.migrate``, to ``--revision``, head by default), and bulk-loads ``--instances``
(1,000,000) instance rows under ``--studies`` (10,000) studies with COPY: patients with 1-6
studies, 2-4 series per study with the modality mixes of bench/find.py (CT with a dose SR,
PET/CT, MR, CR, DX, US, MG), instance counts per series shaped like those modalities (a CT
series holds about a hundred times a CR's) and scaled to the total, StudyDate over the five
years 2020-2024, surnames from bench/find.py's skewed register, one accession number per
study. C-FIND reads only the index, so every instance points at one blob row.

The load is resumable: rows are generated from ``--seed`` in a fixed order and go in by
chunks of 50,000, each committed on its own; a second run (after Ctrl-C, a crash, or to
measure again) continues after the last committed instance. The build's parameters sit in
the database's comment, so a run with other ones refuses the database instead of mixing two
builds (``--fresh`` drops and rebuilds it). After the load the sequences are moved past the
explicit ids (so ingest can insert), the tables are VACUUM ANALYZEd, and the schema is
brought to ``--revision``: a database loaded with ``--revision 0008`` (the indexes before
revision 0009) and then run again without it measures "before" and "after" on the same rows,
and times the migration on a full index.

Then it measures, ``--runs`` (20) times each after one warm-up:
- in-process: ``query.find_encoded()`` (the SQL and the encoded answers the SCP sends, no
  network), as bench/find.py does;
- open association: the same query on one association from tests/rawfind.py to a real
  ``compacs serve`` on that database;
- findscu: DCMTK findscu, one process and association per query (start-up included);
for study-level queries by AccessionNumber, by a one-month StudyDate range, by PatientName
prefix, by ModalitiesInStudy, and the universal study query streaming every study; each
query's SQL is EXPLAIN ANALYZEd into the report. Last, the ingest rate: ``--ingest`` (200)
real 512x512 CT images (tests/dicomdata.ct_series) sent by one storescu association to that
node, acknowledged/s and stored/s (until none is pending) with the index at that size.

Run: ``.venv/bin/python bench/find_scale.py [--instances 1000000] [--studies 10000]
[--revision REV] [--fresh] [--drop]``. A benchmark, not a test: nothing here asserts a speed.
The table goes to stdout and to ``bench/results/find_scale-<stamp>.md``, the plot to
``.png`` beside it (git-ignored). The database is kept for the next run unless ``--drop``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, from any cwd

import common  # noqa: E402  (puts tests/ on sys.path for the harness modules below)
import dicomdata  # noqa: E402
import peers  # noqa: E402
from common import progress  # noqa: E402
from find import (  # noqa: E402
    SOP_CLASS,
    UID_ROOT,
    Query,
    hierarchy,
    measure,
    p95,
    table,
    time_sql,
)
from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

from compacs.service.storage.index import Index, Instance  # noqa: E402
from compacs.service.storage.schema import (  # noqa: E402
    current_revision,
    head_revision,
    migrate,
)

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASE = "compacs_find_scale"
CHUNK = 50_000  # instance rows per COPY transaction: the unit of resumption
FIRST_DAY, LAST_DAY = date(2020, 1, 1), date(2024, 12, 31)
CAP = 100  # answers read before the C-CANCEL of the capped universal query
TARGETS_MS = {"universal, all answers": 250.0}  # the others: 50 ms
TARGET_MS = 50.0


# --------------------------------------------------------------------------- the build


@dataclass
class Plan:
    """Every row but the instances (kept in memory: 10,000 studies are a few MB), and how
    many instances each series gets; generated from the seed alone, so a resumed load
    produces the same rows."""

    patients: list[dict[str, Any]] = field(default_factory=list)
    studies: list[dict[str, Any]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    per_series: list[tuple[int, str, int]] = field(default_factory=list)  # (pk, modality, n)


def plan(n_studies: int, n_instances: int, seed: int) -> Plan:
    days = (LAST_DAY - FIRST_DAY).days + 1
    patients, studies, series, per_series = hierarchy(
        n_studies, seed, FIRST_DAY, days, datetime.now(UTC)
    )
    out = Plan(patients, studies, series)
    raw = [count for _, _, count in per_series]  # relative sizes, scaled below
    # One instance per series, and the rest shared in proportion to the modality-shaped
    # sizes (largest remainders first), so the total is exactly the one asked.
    extra, weight = n_instances - len(raw), sum(r - 1 for r in raw) or 1
    shares = [(r - 1) * extra / weight for r in raw]
    counts = [1 + int(s) for s in shares]
    by_remainder = sorted(range(len(raw)), key=lambda i: int(shares[i]) - shares[i])
    for i in by_remainder[: n_instances - sum(counts)]:
        counts[i] += 1
    for row, count in zip(out.series, counts, strict=True):
        row["instance_count"] = count  # as Index.add_received keeps it
        out.per_series.append((row["id"], row["modality"], count))
    return out


def instance_rows(p: Plan, after: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    """The instance rows with id > `after`, in id order, as tuples in INSTANCE_COLUMNS order."""
    ik = 0
    for sp, modality, count in p.per_series:
        if ik + count <= after:
            ik += count
            continue
        sop_class = SOP_CLASS[modality]
        for number in range(1, count + 1):
            ik += 1
            if ik <= after:
                continue
            yield (
                ik, f"{UID_ROOT}.3.{ik}", sp, sop_class, number, 512, 512, 12, "MODALITY",
                "1.2.840.10008.1.2.1", 526000, "stored", "1.2.840.10008.1.2.4.80", "jpegls",
                110000, 1, 0, 110000, f"sha256:{ik:064x}", 0, 0, now, now,
            )  # fmt: skip


INSTANCE_COLUMNS = (
    "id", "sop_instance_uid", "series_pk", "sop_class_uid", "instance_number", "rows",
    "columns", "bits_stored", "calling_ae", "received_transfer_syntax", "received_size",
    "state", "stored_transfer_syntax", "codec", "stored_size", "blob_pk", "blob_offset",
    "blob_length", "checksum", "version", "attempts", "received_at", "stored_at",
)  # fmt: skip
assert set(INSTANCE_COLUMNS) <= {c.name for c in Instance.__table__.columns}


def _copy(raw: Any, table_name: str, columns: Sequence[str], rows: Iterator[Sequence[Any]]) -> int:
    """COPY `rows` into `table_name` on a DB-API (psycopg) connection; the row count."""
    n = 0
    sql = f"COPY {table_name} ({', '.join(columns)}) FROM STDIN"
    with raw.cursor() as cur, cur.copy(sql) as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def _copy_dicts(raw: Any, table_name: str, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    _copy(raw, table_name, columns, (tuple(r[c] for c in columns) for r in rows))


@dataclass
class Built:
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    load_s: float = 0.0  # this run's COPY time (0 when the database was complete)
    loaded: int = 0  # instance rows this run loaded
    vacuum_s: float = 0.0
    migrate_s: float | None = None  # upgrade to the asked revision after the load
    revision: str = ""
    bytes: int = 0
    accession: str = ""


def build(engine: Engine, args: argparse.Namespace) -> Built:
    """Load what is missing, resumably; then sequences, VACUUM ANALYZE, the asked revision."""
    p = plan(args.studies, args.instances, args.seed)
    out = Built(len(p.patients), len(p.studies), len(p.series), args.instances)
    out.accession = p.studies[len(p.studies) // 2]["accession_number"]
    now = datetime.now(UTC)
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("SELECT count(*) FROM study")
            have_studies = cur.fetchone()[0]
        if not have_studies:
            progress(f"loading {out.patients} patients, {out.studies} studies, {out.series} series")
            _copy_dicts(
                raw,
                "blob",
                [
                    {"id": 1, "tier": "hot", "path": "hot/bench.dcm", "kind": "instance",
                     "size": 1, "checksum": "sha256:0", "created_at": now}
                ],
            )  # fmt: skip
            _copy_dicts(raw, "patient", p.patients)
            _copy_dicts(raw, "study", p.studies)
            _copy_dicts(raw, "series", p.series)
            raw.commit()
        with raw.cursor() as cur:
            cur.execute("SELECT coalesce(max(id), 0) FROM instance")
            after = cur.fetchone()[0]
        if after:
            progress(f"{after} instance rows already loaded: continuing after them")
        rows = instance_rows(p, after, now)
        t0 = time.perf_counter()
        done = after
        while done < args.instances:
            chunk = (row for _, row in zip(range(CHUNK), rows, strict=False))
            n = _copy(raw, "instance", INSTANCE_COLUMNS, chunk)
            raw.commit()
            done += n
            out.loaded += n
            elapsed = time.perf_counter() - t0
            rate = out.loaded / elapsed
            eta = (args.instances - done) / rate if rate else 0.0
            progress(f"  instances {done:>9,}/{args.instances:,}  {rate:,.0f}/s  eta {eta:.0f} s")
        out.load_s = time.perf_counter() - t0
        with raw.cursor() as cur:
            for name in ("patient", "study", "series", "blob", "instance"):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{name}', 'id'),"
                    f" (SELECT coalesce(max(id), 1) FROM {name}))"
                )
        raw.commit()
    finally:
        raw.close()
    if out.loaded:
        t0 = time.perf_counter()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
        out.vacuum_s = time.perf_counter() - t0
    if current_revision(engine) != args.revision:
        progress(f"migrating the loaded index to revision {args.revision}")
        t0 = time.perf_counter()
        migrate(engine, args.revision)
        out.migrate_s = time.perf_counter() - t0
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    out.revision = current_revision(engine) or ""
    with engine.connect() as conn:
        out.bytes = conn.scalar(text("SELECT pg_database_size(current_database())"))
        # what the queries see: earlier runs' ingest added its images to the built rows
        out.studies = conn.scalar(text("SELECT count(*) FROM study"))
        out.series = conn.scalar(text("SELECT count(*) FROM series"))
        out.instances = conn.scalar(text("SELECT count(*) FROM instance"))
    return out


def build_tag(args: argparse.Namespace) -> str:
    return (
        f"compacs bench/find_scale.py: studies={args.studies} instances={args.instances} "
        f"seed={args.seed}"
    )


def open_database(args: argparse.Namespace) -> str:
    """The URL of the bench database: created (and given the schema at `--revision`) when
    missing or with --fresh; refused when it holds another build or is past `--revision`."""
    admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
    url = make_url(args.admin_url).set(database=args.database)
    tag = build_tag(args)
    try:
        with admin.connect() as conn:
            exists = conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": args.database}
            )
            if exists and args.fresh:
                progress(f"dropping database {args.database} (--fresh)")
                conn.exec_driver_sql(f'DROP DATABASE "{args.database}" WITH (FORCE)')
                exists = None
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{args.database}"')
                conn.exec_driver_sql(f"COMMENT ON DATABASE \"{args.database}\" IS '{tag}'")
            comment = conn.scalar(
                text("SELECT shobj_description(oid, 'pg_database') FROM pg_database"
                     " WHERE datname = :d"),
                {"d": args.database},
            )  # fmt: skip
    finally:
        admin.dispose()
    if comment != tag:
        raise SystemExit(
            f"database {args.database} holds another build ({comment!r}, this run: {tag!r}); "
            "run with --fresh to drop and rebuild it, or --database NAME for another one"
        )
    engine = create_engine(url)
    try:
        current = current_revision(engine)
        if current is None:
            migrate(engine, args.revision)
        elif current > args.revision:
            raise SystemExit(
                f"database {args.database} is at revision {current}, past --revision "
                f"{args.revision}; run with --fresh to rebuild it at {args.revision}"
            )
    finally:
        engine.dispose()
    return url.render_as_string(hide_password=False)


# --------------------------------------------------------------------------- the plans


def explain(index: Index, q: Query) -> str:
    """EXPLAIN ANALYZE of the first page's SELECT that find_encoded() sends for `q`: the
    statement is caught on its way to the driver, so the plan is the real code's."""
    caught: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")) and not caught:
            caught.append((statement, params))

    event.listen(index.engine, "before_cursor_execute", catch)
    try:
        time_sql(index, Query(q.label, q.keys, cap=1))
    finally:
        event.remove(index.engine, "before_cursor_execute", catch)
    statement, params = caught[0]
    with index.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", params).all()
    return "\n".join(r[0] for r in rows)


# --------------------------------------------------------------------------- ingest


@dataclass
class Ingest:
    count: int
    acked_s: float = 0.0
    stored_s: float = 0.0
    stored: int = 0
    returncode: int = 0


def ingest(node: peers.CompacsProcess, engine: Engine, files: list[Path]) -> Ingest:
    """One storescu association with `files` to `node`; acknowledged when storescu exits,
    stored when none of the new rows is pending any more (polled on the index by id, which
    the big table answers from its primary key)."""
    out = Ingest(len(files))
    with engine.connect() as conn:
        before = conn.scalar(text("SELECT coalesce(max(id), 0) FROM instance"))
    t0 = time.perf_counter()
    res = subprocess.run(
        common.storescu_args(node.port, node.ae_title, files),
        capture_output=True,
        text=True,
        env=peers.dcmtk_env(),
        timeout=600,
        check=False,
    )
    out.acked_s = time.perf_counter() - t0
    out.returncode = res.returncode
    deadline = time.monotonic() + 600
    count = text(
        "SELECT count(*), count(*) FILTER (WHERE state = 'pending') FROM instance WHERE id > :b"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            total, pending = conn.execute(count, {"b": before}).one()
        if total >= len(files) and not pending:
            break
        if not node.running:
            break
        time.sleep(0.05)
    out.stored_s = time.perf_counter() - t0
    out.stored = total - pending
    return out


# --------------------------------------------------------------------------- report


def plot(queries: list[Query], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [q.label for q in queries]
    series = [
        ("in-process", [statistics.median(q.sql_ms) for q in queries]),
        ("open association", [statistics.median(q.dicom_ms) for q in queries]),
        ("findscu", [statistics.median(q.findscu_ms) for q in queries]),
    ]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.27
    for i, (name, values) in enumerate(series):
        ax.barh([y + (i - 1) * width for y in range(len(labels))], values, width, label=name)
    for y, q in enumerate(queries):
        target = TARGETS_MS.get(q.label, TARGET_MS if q.cap is None else None)
        if target:
            ax.plot([target, target], [y - 0.45, y + 0.45], color="red", linewidth=1.5)
    ax.plot([], [], color="red", label="target")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms per query (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def month_range(studies_engine: Engine) -> str:
    """A full month a year before the newest StudyDate: about 1/60 of the studies."""
    with studies_engine.connect() as conn:
        newest = conn.scalar(text("SELECT max(study_date) FROM study"))
    year, month = int(newest[:4]) - 1, int(newest[4:6])
    first = date(year, month, 1)
    last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    return f"{first:%Y%m%d}-{last:%Y%m%d}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--instances", type=int, default=1_000_000, help="instance rows (1000000)")
    p.add_argument("--studies", type=int, default=10_000, help="studies (10000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=20, help="runs per query (20)")
    p.add_argument("--universal-runs", type=int, default=5, help="runs of the full universal")
    p.add_argument("--ingest", type=int, default=200, help="CT images to send (200; 0: none)")
    p.add_argument("--admin-url", default=ADMIN_URL, help=f"a server login ({ADMIN_URL})")
    p.add_argument("--database", default=DATABASE, help=f"the bench database ({DATABASE})")
    p.add_argument("--revision", default=None, help="schema revision to measure (head)")
    p.add_argument("--fresh", action="store_true", help="drop the database and rebuild it")
    p.add_argument("--drop", action="store_true", help="drop the database at the end")
    p.add_argument("--keep", action="store_true", help="keep the data folder and node log")
    args = p.parse_args(argv)
    if args.studies < 10 or args.instances < 3 * args.studies:
        p.error("--studies >= 10 and --instances >= 3 x --studies (every series has one)")
    if args.runs < 1 or args.universal_runs < 1 or args.ingest < 0:
        p.error("--runs and --universal-runs >= 1, --ingest >= 0")
    if not args.database.replace("_", "").isalnum():
        p.error("--database: letters, digits and _ only")
    args.revision = args.revision or head_revision()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.handle_signals()
    stamp, tmp = common.make_tmp("find_scale")
    url = open_database(args)
    engine = create_engine(url)
    try:
        built = build(engine, args)
    finally:
        engine.dispose()
    migrated = f", upgraded to it in {built.migrate_s:.1f} s" if built.migrate_s else ""
    progress(
        f"index: {built.instances:,} instances, {built.studies:,} studies, revision "
        f"{built.revision}{migrated}, {built.bytes / 1e6:.0f} MB"
    )
    data = tmp / "data"
    data.mkdir()
    node: peers.CompacsProcess | None = None
    index = Index.open(url)
    try:
        month = month_range(index.engine)
        queries = [
            Query(f"AccessionNumber={built.accession}", {"AccessionNumber": built.accession}),
            Query(f"StudyDate={month}", {"StudyDate": month}),
            Query("PatientName=SMITH*", {"PatientName": "SMITH*"}),
            Query("PatientName=smi*", {"PatientName": "smi*"}),
            Query("ModalitiesInStudy=MG", {"ModalitiesInStudy": "MG"}),
            Query(f"universal, C-CANCEL after {CAP}", {}, cap=CAP),
            Query("universal, all answers", {}, runs=args.universal_runs),
        ]
        plans = {q.label: explain(index, q) for q in queries}

        node = peers.CompacsProcess(
            data, log_path=tmp / "compacs.log", env={"COMPACS_INDEX_URL": url}
        )
        node.start()
        measure(index, node, queries, args.runs)

        result: Ingest | None = None
        if args.ingest:
            files = dicomdata.ct_series(tmp / "input", args.ingest)
            progress(f"ingest: {len(files)} CT images, one storescu association")
            result = ingest(node, index.engine, files)

        text_table = table(queries)
        verdicts = []
        for q in queries:
            target = TARGETS_MS.get(q.label, TARGET_MS if q.cap is None else None)
            if target:
                med = statistics.median(q.sql_ms)
                verdicts.append(
                    f"- {q.label}: in-process median {med:.1f} ms, p95 {p95(q.sql_ms):.1f} ms "
                    f"(target {target:.0f} ms: {'met' if med < target else 'MISSED'})"
                )
        print(text_table)
        print("\n".join(verdicts))
        lines = [
            f"# C-FIND and ingest at scale, PostgreSQL {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- command: `{common.command_line()}`",
            f"- machine: {common.machine(memory=False)}, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (a shared machine: "
            "other jobs' CPU shows in every figure)",
            f"- index: PostgreSQL database {args.database}, {built.patients:,} patients, "
            f"{built.studies:,} studies, {built.series:,} series, {built.instances:,} "
            f"instances, {built.bytes / 1e6:.0f} MB, schema revision {built.revision}",
            f"- load: {built.loaded:,} instance rows by COPY this run in {built.load_s:.1f} s"
            + (f" ({built.loaded / built.load_s:,.0f} rows/s)" if built.loaded else "")
            + f", VACUUM ANALYZE {built.vacuum_s:.1f} s"
            + (f", migration to {built.revision} on the loaded index {built.migrate_s:.1f} s"
               if built.migrate_s else ""),
            "- in-process: query.find_encoded() (SQL + encoded answers, no network); open "
            "association: tests/rawfind.py on one association to `compacs serve`; findscu: "
            "DCMTK findscu -S, one process and association per query",
            "",
            text_table,
            "",
            *verdicts,
            "",
        ]  # fmt: skip
        if result is not None:
            lines += [
                f"- ingest with the index at {built.instances:,} instances: {result.count} CT "
                f"512x512 over one storescu association, acknowledged in {result.acked_s:.2f} s "
                f"({result.count / result.acked_s:.1f}/s), stored in {result.stored_s:.2f} s "
                f"({result.stored / result.stored_s:.1f}/s), {result.stored} stored, storescu "
                f"exit {result.returncode}",
                "",
            ]
            print(lines[-2])
        for label, text_plan in plans.items():
            lines += [f"## EXPLAIN ANALYZE: {label}", "", "```", text_plan, "```", ""]
        report = common.write_report("find_scale", stamp, lines)
        plot(
            queries,
            report.with_suffix(".png"),
            f"C-FIND, PostgreSQL, {built.instances:,} instances / {built.studies:,} studies, "
            f"revision {built.revision}",
        )
        progress(f"plot: {report.with_suffix('.png')}")
    finally:
        if node is not None:
            node.stop()
        index.close()
        common.cleanup(tmp, args.keep)
        if args.drop:
            admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
            admin.dispose()
            progress(f"dropped database {args.database}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
