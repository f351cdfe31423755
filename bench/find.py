"""C-FIND benchmark: study-level queries against 10,000 studies in a SQLite index.

Builds a data folder whose SQLite index holds ``--studies`` (10,000) studies written straight
through SQLAlchemy Core (bulk inserts, no DICOM files: C-FIND reads only the index), with
realistic shapes: patients with 1-6 studies, 2-4 series per study, modality mixes per study
kind (CT with a dose SR, PET/CT, MR, CR, DX, MG, US), instance counts per series as modalities
produce them (CT 100-400, MR 20-200, CR 1-2 ...), dates spread over 2015-2024, names drawn from
a skewed surname list (SMITH is the most common, as in real registers).

Then it starts a real ``python -m compacs.service.cli serve`` on that folder and times each
query on one open association from ``tests/rawfind.py`` (a bare-socket SCU: pynetdicom's
own SCU spends ~1 ms of CPU decoding each answer on the node's two cores; C-FIND-RQ sent until
the final response received, every pending answer read), ``--runs`` (20) times, and the same
query in-process through ``identifier_encoding.find_encoded()`` (SQL plus encoding the
answers, as the SCP does, no network), to separate the index from the DIMSE transport.
Every query asks for the keys a viewer's study list asks for, computed ones included
(ModalitiesInStudy, NumberOfStudyRelatedSeries/Instances).

Run: ``.venv/bin/python bench/find.py [--studies 10000] [--runs 20] [--keep]``.
A benchmark, not a test: nothing here asserts a speed. The table goes to stdout and to
``bench/results/find-<timestamp>.md`` (git-ignored).
"""

from __future__ import annotations

import argparse
import random
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
import peers  # noqa: E402
from common import progress  # noqa: E402
from pydicom import Dataset  # noqa: E402
from rawfind import RawFindSCU  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from compacs.service.dimse.identifier_encoding import find_encoded  # noqa: E402
from compacs.service.storage.index import Blob, Index, Instance, Patient, Series, Study  # noqa: E402
from compacs.service.storage.schema import PATIENT_RECEIVED, patient_identity  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # pydicom's root + a branch of our own
CAP = 100  # answers read before the C-CANCEL of the "capped" universal query
CHUNK = 20_000  # rows per bulk INSERT transaction

SURNAMES = [  # (surname, weight): skewed like a real register
    ("SMITH", 40), ("JOHNSON", 30), ("WILLIAMS", 26), ("BROWN", 24), ("JONES", 24),
    ("GARCIA", 20), ("MILLER", 20), ("DAVIS", 19), ("RODRIGUEZ", 17), ("MARTINEZ", 17),
    ("HERNANDEZ", 15), ("LOPEZ", 15), ("GONZALEZ", 14), ("WILSON", 14), ("ANDERSON", 13),
    ("THOMAS", 13), ("TAYLOR", 13), ("MOORE", 12), ("JACKSON", 12), ("MARTIN", 12),
    ("LEE", 11), ("PEREZ", 11), ("THOMPSON", 11), ("WHITE", 11), ("HARRIS", 10),
    ("SANCHEZ", 10), ("CLARK", 10), ("RAMIREZ", 9), ("LEWIS", 9), ("ROBINSON", 9),
    ("WALKER", 9), ("YOUNG", 9), ("ALLEN", 8), ("KING", 8), ("WRIGHT", 8), ("SCOTT", 8),
    ("MUELLER", 7), ("SCHMIDT", 7), ("SCHNEIDER", 6), ("FISCHER", 6), ("WEBER", 6),
    ("DUBOIS", 5), ("MARTIN-LEROY", 3), ("NGUYEN", 8), ("TANAKA", 4), ("SUZUKI", 4),
    ("SMITHSON", 2), ("SMITHERS", 1), ("GOLDSMITH", 2), ("O'BRIEN", 4),
]  # fmt: skip
SYLLABLES = ["BAR", "KEL", "MOR", "DAN", "VIK", "LOR", "TES", "HAM", "RIN", "SOL", "PET", "GUS"]
# The long tail of a real register: 1,728 rarer names, weight 1 each (SMITH* ends up ~2 %).
TAIL = [(a + b + c, 1) for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]
GIVEN = [
    "JAMES", "MARY", "JOHN", "PATRICIA", "ROBERT", "JENNIFER", "MICHAEL", "LINDA", "DAVID",
    "ELIZABETH", "WILLIAM", "BARBARA", "RICHARD", "SUSAN", "JOSEPH", "JESSICA", "THOMAS",
    "SARAH", "ANNA", "PETER", "MARIA", "JUAN", "HANS", "CLAIRE", "YUKI", "LUCAS",
]  # fmt: skip
PHYSICIANS = ["HOUSE^GREGORY", "GREY^MEREDITH", "WATSON^JOHN", "QUINN^MICHAELA", ""]

# study kind -> (weight, descriptions, series: [(modality, (min, max) instances)], extra)
KINDS: dict[str, tuple[int, list[str], list[tuple[str, tuple[int, int]]]]] = {
    "CT": (30, ["CT CHEST", "CT ABDOMEN PELVIS", "CT HEAD", "CTA NECK"],
           [("CT", (100, 400)), ("CT", (100, 400)), ("SR", (1, 1)), ("CT", (2, 3))]),
    "MR": (20, ["MR BRAIN", "MR KNEE", "MR SPINE LUMBAR"],
           [("MR", (20, 200)), ("MR", (20, 200)), ("MR", (20, 200)), ("MR", (20, 200))]),
    "CR": (18, ["CHEST PA LAT", "HAND LEFT", "PELVIS"],
           [("CR", (1, 2)), ("CR", (1, 2)), ("CR", (1, 1)), ("CR", (1, 1))]),
    "DX": (8, ["CHEST AP", "KNEE RIGHT"], [("DX", (1, 2)), ("DX", (1, 2)), ("DX", (1, 1))]),
    "US": (10, ["US ABDOMEN", "US THYROID"],
           [("US", (1, 40)), ("US", (1, 40)), ("SR", (1, 1)), ("US", (1, 10))]),
    "MG": (9, ["MAMMO SCREENING BILAT"], [("MG", (2, 4)), ("MG", (2, 4)), ("SR", (1, 1))]),
    "PT": (5, ["PET CT WHOLE BODY"],
           [("PT", (150, 300)), ("CT", (150, 300)), ("CT", (1, 2)), ("SR", (1, 1))]),
}  # fmt: skip
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128", "SR": "1.2.840.10008.5.1.4.1.1.88.22",
}  # fmt: skip
RETURN_KEYS = [  # what a viewer's study list asks for
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]  # fmt: skip


# --------------------------------------------------------------------------- data


@dataclass
class Built:
    studies: int = 0
    series: int = 0
    instances: int = 0
    patients: int = 0
    seconds: float = 0.0
    accession: str = ""  # one existing accession number, for the exact-match query
    bytes: int = 0


def _chunks(rows: Iterator[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


Hierarchy = tuple[
    list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[tuple[int, str, int]]
]


def hierarchy(n_studies: int, seed: int, start: date, days: int, now: datetime) -> Hierarchy:
    """Patient, study and series rows (explicit primary keys) and (series pk, modality,
    instance count) per series, from the seed alone: StudyDate over `days` days from
    `start`. bench/find_scale.py builds its PostgreSQL index from the same rows."""
    rng = random.Random(seed)
    names, weights = zip(*SURNAMES, *TAIL, strict=True)
    kinds = list(KINDS)
    kind_weights = [KINDS[k][0] for k in kinds]
    patients: list[dict[str, Any]] = []
    studies: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    per_series: list[tuple[int, str, int]] = []  # (series pk, modality, instance count)

    while len(studies) < n_studies:
        pid = len(patients) + 1
        birth = date(1930, 1, 1) + timedelta(days=rng.randrange(90 * 365))
        patient = {
            "patient_id": f"PID{pid:07d}",
            "patient_name": f"{rng.choices(names, weights)[0]}^{rng.choice(GIVEN)}",
            "patient_birth_date": birth.strftime("%Y%m%d"),
            "patient_sex": rng.choice("MF"),
        }
        identity = patient_identity(
            patient["patient_id"], None, patient["patient_name"], patient["patient_birth_date"], ""
        )
        patients.append({"id": pid, "identity": identity, **patient})
        for _ in range(min(1 + int(rng.expovariate(0.8)), 6, n_studies - len(studies))):
            sk = len(studies) + 1
            kind = rng.choices(kinds, kind_weights)[0]
            _, descriptions, plan = KINDS[kind]
            when = start + timedelta(days=rng.randrange(days))
            studies.append(
                {
                    "id": sk,
                    "study_instance_uid": f"{UID_ROOT}.1.{sk}",
                    "patient_pk": pid,
                    "study_date": when.strftime("%Y%m%d"),
                    "study_time": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}"
                    f"{rng.randrange(60):02d}",
                    "accession_number": f"A{sk * 7919 % 10**8:08d}",
                    "study_id": str(sk % 100000),
                    "study_description": rng.choice(descriptions),
                    "referring_physician_name": rng.choice(PHYSICIANS) or None,
                    # each study keeps its patient's attributes, as ingest writes them
                    "patient_name": patient["patient_name"],
                    "patient_birth_date": patient["patient_birth_date"],
                    "patient_sex": patient["patient_sex"],
                    "patient_source": PATIENT_RECEIVED,
                    "created_at": now,
                }
            )
            for number, (modality, (lo, hi)) in enumerate(plan[: rng.randint(2, 4)], start=1):
                sp = len(series) + 1
                count = rng.randint(lo, hi)
                series.append(
                    {
                        "id": sp,
                        "series_instance_uid": f"{UID_ROOT}.2.{sp}",
                        "study_pk": sk,
                        "modality": modality,
                        "series_number": number,
                        "series_description": f"{modality} SERIES {number}",
                        "body_part_examined": None,
                        "instance_count": count,  # as Index.add_received keeps it
                        "created_at": now,
                    }
                )
                per_series.append((sp, modality, count))
    return patients, studies, series, per_series


def build(index: Index, n_studies: int, seed: int) -> Built:
    """Bulk-insert patients, studies, series and instances with explicit primary keys."""
    t0 = time.perf_counter()
    out = Built()
    start, days = date(2015, 1, 1), (date(2024, 12, 31) - date(2015, 1, 1)).days
    now = datetime.now(UTC)
    patients, studies, series, per_series = hierarchy(n_studies, seed, start, days, now)
    out.accession = studies[len(studies) // 2]["accession_number"]

    # Instances (millions of rows) go in as plain tuples through the engine's DB-API
    # executemany: SQLAlchemy's per-row parameter processing would triple the build time.
    # Timestamps are formatted once by the column type's own bind processor, so the rows read
    # back exactly like rows written by the ORM.
    dialect = index.engine.dialect
    stamp = Instance.__table__.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
    now_db = stamp(now) if stamp else now
    columns = [c.name for c in Instance.__table__.columns]
    sql = f"INSERT INTO instance ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"

    constant = {
        "rows": 512,
        "columns": 512,
        "bits_stored": 12,
        "calling_ae": "MODALITY",
        "received_transfer_syntax": "1.2.840.10008.1.2.1",
        "received_size": 526000,
        "state": "stored",
        "stored_transfer_syntax": "1.2.840.10008.1.2.4.80",
        "codec": "jpegls",
        "stored_size": 110000,
        # C-FIND never reads blobs: every instance points at one blob row
        "blob_pk": 1,
        "blob_offset": 0,
        "blob_length": 110000,
        "version": 0,
        "attempts": 0,
        "received_at": now_db,
        "stored_at": now_db,
    }

    template = [constant.get(c) for c in columns]
    variable = ("id", "sop_instance_uid", "series_pk", "sop_class_uid", "instance_number")
    positions = [columns.index(c) for c in variable]
    checksum_pos = columns.index("checksum")

    def instances() -> Iterator[tuple[Any, ...]]:
        ik = 0
        for sp, modality, count in per_series:
            for number in range(1, count + 1):
                ik += 1
                uid = f"{UID_ROOT}.3.{ik}"
                row = template.copy()
                for pos, value in zip(
                    positions,
                    (ik, uid, sp, SOP_CLASS[modality], number),
                    strict=True,
                ):
                    row[pos] = value
                row[checksum_pos] = f"sha256:{ik:064x}"
                yield tuple(row)

    with index.engine.begin() as conn:
        conn.execute(
            insert(Blob.__table__),
            [
                {
                    "id": 1,
                    "tier": "hot",
                    "path": "hot/bench.dcm",
                    "kind": "instance",
                    "size": 1,
                    "checksum": "sha256:0",
                    "created_at": now,
                }
            ],
        )
        conn.execute(insert(Patient.__table__), patients)
        conn.execute(insert(Study.__table__), studies)
        conn.execute(insert(Series.__table__), series)
    for batch in _chunks(instances()):
        with index.engine.begin() as conn:
            conn.exec_driver_sql(sql, batch)
        out.instances += len(batch)
    out.patients, out.studies, out.series = len(patients), len(studies), len(series)
    out.seconds = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- queries


@dataclass
class Query:
    label: str
    keys: dict[str, str]
    cap: int | None = None  # C-CANCEL after this many answers
    runs: int | None = None  # fewer runs for the big universal query
    dicom_ms: list[float] = field(default_factory=list)
    sql_ms: list[float] = field(default_factory=list)
    findscu_ms: list[float] = field(default_factory=list)
    findscu_matches: set[int] = field(default_factory=set)
    matches: set[int] = field(default_factory=set)
    sql_matches: set[int] = field(default_factory=set)
    final: set[str] = field(default_factory=set)


def identifier(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, None if keyword.startswith("NumberOf") else "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def time_dicom(scu: RawFindSCU, q: Query, msg_id: int) -> None:
    ds = identifier(q.keys)
    t0 = time.perf_counter()
    result = scu.find(ds, msg_id, cap=q.cap)
    q.dicom_ms.append((time.perf_counter() - t0) * 1000)
    q.matches.add(result.pending)
    q.final.add(f"0x{result.status:04X}")


def time_findscu(tool: str, node: peers.CompacsProcess, q: Query) -> None:
    """The same query from DCMTK findscu (C++, TCP_NODELAY=1): what a viewer built on DCMTK
    sees, process start and association included (a one-answer query is mostly those)."""
    args = [tool, "-v", "-S", "-aet", "BENCHFIND", "-aec", node.ae_title]
    args += ["-k", "QueryRetrieveLevel=STUDY"]
    for keyword in RETURN_KEYS:
        if keyword not in q.keys:
            args += ["-k", keyword]
    for keyword, value in q.keys.items():
        args += ["-k", f"{keyword}={value}"]
    if q.cap is not None:
        args += ["--cancel", str(q.cap)]
    args += [node.host, str(node.port)]
    t0 = time.perf_counter()
    res = subprocess.run(
        args, capture_output=True, text=True, env=peers.dcmtk_env(), timeout=600, check=False
    )
    q.findscu_ms.append((time.perf_counter() - t0) * 1000)
    out = res.stdout + res.stderr
    q.findscu_matches.add(out.count("(Pending)"))


def time_sql(index: Index, q: Query) -> None:
    ds = identifier(q.keys)
    t0 = time.perf_counter()
    n = 0
    for _answer in find_encoded(index, ds, "study", implicit_vr=False, retrieve_ae_title="COMPACS"):
        n += 1
        if q.cap is not None and n == q.cap:
            break
    q.sql_ms.append((time.perf_counter() - t0) * 1000)
    q.sql_matches.add(n)


def measure(index: Index, node: peers.CompacsProcess, queries: list[Query], runs: int) -> None:
    """Each query on one open association, from findscu and in-process: one warm-up of
    each, not timed, then `runs` (or the query's own) timed runs, interleaved so that a
    busy moment of the machine hits all three columns alike."""
    findscu = common.dcmtk_tool("findscu")
    scu = RawFindSCU(node.host, node.port, node.ae_title, calling="BENCHSCU")
    msg_id = 0
    try:
        for q in queries:
            msg_id += 1
            time_dicom(scu, q, msg_id)
            time_sql(index, q)
            time_findscu(findscu, node, q)
            q.dicom_ms.clear()
            q.sql_ms.clear()
            q.findscu_ms.clear()
        for q in queries:
            n = q.runs or runs
            progress(f"{q.label}: {n} runs")
            for _ in range(n):
                msg_id = msg_id % 65000 + 1
                time_dicom(scu, q, msg_id)
                time_findscu(findscu, node, q)
                time_sql(index, q)
    finally:
        scu.release()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def table(queries: list[Query]) -> str:
    head = [
        "query",
        "matches",
        "runs",
        "open assoc. median ms",
        "open assoc. p95 ms",
        "findscu median ms",
        "findscu p95 ms",
        "in-process median ms",
        "in-process p95 ms",
        "final status",
    ]
    rows = [head, ["---"] * len(head)]
    for q in queries:
        matches = "/".join(str(m) for m in sorted(q.matches))
        if q.cap is not None:
            low, high = min(q.matches), max(q.matches)
            f_low, f_high = min(q.findscu_matches), max(q.findscu_matches)
            matches = f"{low}-{high} (findscu {f_low}-{f_high}) before the cancel took effect"
        rows.append(
            [
                q.label,
                matches,
                str(len(q.dicom_ms)),
                f"{statistics.median(q.dicom_ms):.1f}",
                f"{p95(q.dicom_ms):.1f}",
                f"{statistics.median(q.findscu_ms):.1f}",
                f"{p95(q.findscu_ms):.1f}",
                f"{statistics.median(q.sql_ms):.1f}",
                f"{p95(q.sql_ms):.1f}",
                ",".join(sorted(q.final)),
            ]
        )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--studies", type=int, default=10_000, help="studies to index (10000)")
    p.add_argument("--runs", type=int, default=20, help="runs per query (20)")
    p.add_argument("--universal-runs", type=int, default=5, help="runs of the full universal")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the data folder and node log")
    args = p.parse_args(argv)
    if args.studies < 10 or args.runs < 1 or args.universal_runs < 1:
        p.error("--studies >= 10, --runs and --universal-runs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.handle_signals()
    stamp, tmp = common.make_tmp("find")
    data = tmp / "data"
    data.mkdir()
    node: peers.CompacsProcess | None = None
    index: Index | None = None
    try:
        index = Index.open(f"sqlite:///{data / 'index.sqlite'}", create=True)
        built = build(index, args.studies, args.seed)
        built.bytes = sum(p.stat().st_size for p in data.glob("index.sqlite*"))
        progress(
            f"indexed {built.patients} patients, {built.studies} studies, {built.series} "
            f"series, {built.instances} instances in {built.seconds:.1f} s "
            f"({built.bytes / 1e6:.0f} MB of SQLite)"
        )
        with index.reading() as s:
            month = s.scalar(select(func.max(Study.study_date)))[:6]
        month = f"{int(month[:4]) - 1}{month[4:]}"  # a full month, a year before the last
        last_day = (date(int(month[:4]), int(month[4:]), 28) + timedelta(days=4)).replace(day=1)
        last_day -= timedelta(days=1)
        queries = [
            Query("PatientName=SMITH*", {"PatientName": "SMITH*"}),
            Query(
                f"StudyDate={month}01-{last_day:%Y%m%d}",
                {"StudyDate": f"{month}01-{last_day:%Y%m%d}"},
            ),
            Query("ModalitiesInStudy=CT", {"ModalitiesInStudy": "CT"}),
            Query(f"AccessionNumber={built.accession}", {"AccessionNumber": built.accession}),
            Query(f"universal, C-CANCEL after {CAP}", {}, cap=CAP),
            Query("universal, all answers", {}, runs=args.universal_runs),
        ]

        node = peers.CompacsProcess(data, log_path=tmp / "compacs.log")
        node.start()
        measure(index, node, queries, args.runs)

        text = table(queries)
        print(text)
        report = [
            f"# C-FIND benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- command: `{common.command_line()}`",
            f"- machine: {common.machine(memory=False)}",
            f"- index: SQLite, {built.patients} patients, {built.studies} studies, "
            f"{built.series} series, {built.instances} instances ({built.bytes / 1e6:.0f} MB), "
            f"built in {built.seconds:.1f} s",
            "- DICOM: tests/rawfind.py (a bare-socket SCU: no per-answer decoding on the "
            "client), Study Root, one association, C-FIND-RQ sent until the final response "
            "read, TCP_NODELAY on both ends; findscu: DCMTK findscu -S, one "
            "process and association per query (start-up included); in-process: the same "
            "query through identifier_encoding.find_encoded() (SQL + encoded answers, "
            "no network)",
            f"- return keys: {', '.join(RETURN_KEYS)}",
            "",
            text,
            "",
        ]
        common.write_report("find", stamp, report)
    finally:
        if node is not None:
            node.stop()
        if index is not None:
            index.close()
        common.cleanup(tmp, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
