"""C-GET benchmark: a 300-instance CT study stored as JPEG-LS, retrieved with DCMTK getscu.

One study of ``--count`` (300) CT 512² instances (``dicomdata.ct_series``: a real slice, fresh
UIDs, uncompressed) is stored once into each server, both holding it as JPEG-LS lossless:

  compacs      compacs, default rules (CT -> JPEG-LS, verified); stored when ``pending == 0``
  orthanc      Orthanc 1.10 with IngestTranscoding = JPEG-LS lossless (checked over REST
               for every instance: /instances/<id>/metadata/TransferSyntax)

then DCMTK ``getscu`` retrieves the whole study (study root, STUDY level, StudyInstanceUID)
into an empty folder, ``--repeat`` (3) times per row, the rows interleaved:

  compacs      requestor accepts only uncompressed (getscu's default proposals, no +x
               option): compacs decodes every JPEG-LS blob on the way out
  orthanc      the same requestor against Orthanc: Orthanc decodes on the way out
  compacs-xt   extra, for comparison: the requestor also accepts JPEG-LS (getscu +xt):
               compacs passes the stored bytes through

Measured per run: wall time from getscu's start to its exit (images/s = count / wall), the time
to the first image (getscu start until getscu logs "Sending C-STORE Response" for the first
sub-operation: it writes the file before answering; the first file seen in the output folder,
polled every 5 ms, is reported beside it), the steady rate between the first and the last
image, the peak RSS of the server's process tree (the process and all its descendants, summed,
sampled every 50 ms) and the server tree's CPU time per image. A run counts only when getscu
reports every sub-operation completed, the output folder holds exactly the study's SOP
Instance UIDs in the expected transfer syntax, and the first and last instance decode to the
original pixels; a run that fails a check is shown as FAILED and left out of the medians.

``--profile``: after the measured runs, one more compacs (uncompressed) C-GET, not counted,
with ``py-spy record`` attached to the node; the hottest functions go into the report.

Run: ``.venv/bin/python bench/retrieve.py [--count 300] [--repeat 3]
[--only compacs,orthanc,compacs-xt] [--keep] [--profile] [--wait-quiet S]``.
A benchmark, not a test: nothing here asserts a speed. The table goes to stdout and to
``bench/results/retrieve-<timestamp>.md`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.filereader import read_file_meta_info

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, from any cwd

import common  # noqa: E402  (puts tests/ on sys.path for the harness modules below)
import dicomdata  # noqa: E402
import peers  # noqa: E402
from common import (  # noqa: E402
    QUIET_CORES,
    TreeSampler,
    dcmtk_tool,
    fmt,
    machine_busy_seconds,
    own_cpu_seconds,
    progress,
    settle,
    tree_cpu_seconds,
    tree_rss,
    wait_quiet,
)
from nodecheck import wait_compressed  # noqa: E402

JPEG_LS = "1.2.840.10008.1.2.4.80"
UNCOMPRESSED = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
DIR_POLL = 0.005  # s between polls of the output folder for the first file
GET_TIMEOUT = 600.0


# --------------------------------------------------------------------------- DCMTK binaries


def dcmtk_version() -> str:
    return common.dcmtk_version("getscu").strip("$").strip()


def store(port: int, aec: str, files: Sequence[Path]) -> None:
    """storescu (one association, uncompressed, as the harness's peers.storescu) and check
    that every file was answered Success."""
    res = subprocess.run(
        common.storescu_args(port, aec, files),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=peers.dcmtk_env(),
        timeout=GET_TIMEOUT,
    )
    if not peers.store_ok(res, files):
        raise peers.PeerError(f"storescu to {aec} did not store every file:\n{res.stdout[-3000:]}")


# --------------------------------------------------------------------------- servers


class Server:
    """A server holding the study as JPEG-LS."""

    name = "?"
    aec = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: peers.ManagedProcess | None = None
        self.setup_notes: list[str] = []
        self.stored_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        assert self.proc is not None
        return self.proc.port

    def start_and_store(self, files: Sequence[Path]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.graceful_teardown:
                self.proc.stop(timeout=60)
            else:
                self.proc.kill9()

    def log_problems(self) -> list[str]:
        return []

    def version(self) -> str:
        return self.name


class CompacsServer(Server):
    name = "compacs"
    aec = "COMPACS"

    def start_and_store(self, files: Sequence[Path]) -> None:
        node = peers.CompacsProcess(self.workdir / "data", ae_title=self.aec)
        self.proc = node
        node.start()
        t = time.perf_counter()
        store(node.port, self.aec, files)
        stats = wait_compressed(node, len(files), timeout=max(300.0, 2.0 * len(files)))
        self.stored_s = time.perf_counter() - t
        jpegls = stats.get("by_codec", {}).get("jpegls", {}).get("instances", 0)
        if stats["instances"] != len(files) or jpegls != len(files):
            raise peers.PeerError(f"compacs did not store all as JPEG-LS: {stats}")
        # The blobs on disk, by transfer syntax (meta headers only).
        blobs = sorted((node.data_dir / "archive" / "hot").rglob("*.dcm"))
        syntaxes = Counter(str(read_file_meta_info(b).TransferSyntaxUID) for b in blobs)
        if syntaxes != Counter({JPEG_LS: len(files)}):
            raise peers.PeerError(f"compacs blobs by transfer syntax: {dict(syntaxes)}")
        self.setup_notes.append(
            f"compacs: {len(files)} stored and compressed in {self.stored_s:.1f} s; "
            f"{len(blobs)} blobs, all {JPEG_LS}; ratio {stats.get('ratio')}"
        )

    def log_problems(self) -> list[str]:
        assert isinstance(self.proc, peers.CompacsProcess)
        n, hits = common.compacs_log_problems(self.proc.log_text())
        if not n:
            return []
        return [f"{n} ERROR/WARNING lines in {self.proc.log_path}"] + [
            f"    {ln[:300]}" for ln in hits
        ]

    def version(self) -> str:
        return common.compacs_version()


class OrthancServer(Server):
    name = "orthanc"
    aec = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._version = "Orthanc"

    def start_and_store(self, files: Sequence[Path]) -> None:
        orthanc = peers.OrthancProcess(self.workdir, aet=self.aec, ingest_transcoding=JPEG_LS)
        self.proc = orthanc
        orthanc.start()
        with contextlib.suppress(Exception):
            self._version = f"Orthanc {orthanc.get_json('/system')['Version']}"
        t = time.perf_counter()
        store(orthanc.dicom_port, self.aec, files)
        self.stored_s = time.perf_counter() - t
        ids = orthanc.instances()
        syntaxes = Counter(orthanc.instance_transfer_syntax(i) for i in ids)
        if len(ids) != len(files) or syntaxes != Counter({JPEG_LS: len(files)}):
            raise peers.PeerError(
                f"Orthanc holds {len(ids)} instances, by transfer syntax {dict(syntaxes)}"
            )
        self.setup_notes.append(
            f"Orthanc: {len(files)} stored in {self.stored_s:.1f} s; REST TransferSyntax "
            f"metadata of all {len(ids)}: {JPEG_LS}"
        )

    def version(self) -> str:
        return self._version


@dataclass(frozen=True)
class Row:
    key: str
    server: str  # key of SERVERS
    label: str
    accepts: str
    extra: tuple[str, ...]  # getscu options choosing what the requestor accepts
    expect: frozenset[str]  # transfer syntaxes the received files must have


ROWS: dict[str, Row] = {
    "compacs": Row(
        "compacs",
        "compacs",
        "compacs (JPEG-LS stored)",
        "uncompressed only",
        (),
        frozenset(UNCOMPRESSED),
    ),
    "orthanc": Row(
        "orthanc",
        "orthanc",
        "Orthanc 1.10 (JPEG-LS stored)",
        "uncompressed only",
        (),
        frozenset(UNCOMPRESSED),
    ),
    "compacs-xt": Row(
        "compacs-xt",
        "compacs",
        "compacs (JPEG-LS stored), pass-through",
        "JPEG-LS + uncompressed (+xt)",
        ("+xt",),
        frozenset({JPEG_LS}),
    ),
}
SERVERS = {"compacs": CompacsServer, "orthanc": OrthancServer}


# --------------------------------------------------------------------------- one C-GET


@dataclass
class GetRun:
    key: str
    wall_s: float = 0.0
    first_s: float | None = None  # getscu start -> first "Sending C-STORE Response"
    first_file_s: float | None = None  # getscu start -> first file seen in the folder
    last_s: float | None = None  # getscu start -> last "Sending C-STORE Response"
    completed: int = 0  # getscu's "Number of Completed Suboperations"
    failed: int | None = None
    received: int = 0
    rss_before: int = 0
    peak_rss: int = 0
    cpu_server: float = 0.0
    others_cores: float = 0.0
    verified: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def counted(self) -> bool:
        return self.verified and not self.problems

    @property
    def busy(self) -> bool:
        return self.others_cores >= QUIET_CORES


def getscu_args(row: Row, server: Server, study: str, out: Path) -> list[str]:
    args = [dcmtk_tool("getscu"), "-v", "-S", "-aet", "GETSCU", "-aec", server.aec]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    args += ["-od", str(out), *row.extra, peers.LOOPBACK, str(server.port)]
    return args


def run_get(row: Row, server: Server, study: str, out: Path, log_path: Path) -> GetRun:
    """One getscu C-GET of the study into the empty folder ``out``, measured."""
    out.mkdir(parents=True)
    run = GetRun(row.key)
    lines: list[tuple[float, str]] = []
    run.rss_before = tree_rss(server.pid)
    sampler = TreeSampler(server.pid)
    sampler.start()
    cpu0 = tree_cpu_seconds(server.pid)
    busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        getscu_args(row, server, study, out),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=peers.dcmtk_env(),
    )

    def read() -> None:  # getscu's log lines, time-stamped as they arrive
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            lines.append((time.perf_counter() - t0, raw.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read, name="getscu-log", daemon=True)
    reader.start()
    try:
        while proc.poll() is None and run.first_file_s is None:
            with os.scandir(out) as it:
                if any(True for _ in it):
                    run.first_file_s = time.perf_counter() - t0
                    break
            time.sleep(DIR_POLL)
        proc.wait(GET_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            run.problems.append("getscu killed after the timeout")
    run.wall_s = time.perf_counter() - t0
    reader.join(10)
    cpu1 = tree_cpu_seconds(server.pid)
    run.peak_rss = sampler.stop()
    run.cpu_server = cpu1 - cpu0
    ours = run.cpu_server + own_cpu_seconds() - own0
    run.others_cores = max(0.0, (machine_busy_seconds() - busy0 - ours) / run.wall_s)
    log_path.write_text("\n".join(f"{t:9.4f} {text}" for t, text in lines) + "\n")

    responses = [t for t, text in lines if text.startswith("I: Sending C-STORE Response")]
    if responses:
        run.first_s, run.last_s = responses[0], responses[-1]
    bad = [text for _t, text in lines if text.startswith("I: Sending C-STORE Response")]
    bad = [text for text in bad if "(Success)" not in text]
    if bad:
        run.problems.append(f"{len(bad)} sub-operations not stored by getscu, e.g. {bad[0]}")
    for _t, text in lines:
        if "Number of Completed Suboperations" in text:
            run.completed = int(text.rsplit(":", 1)[1])
        elif "Number of Failed Suboperations" in text:
            run.failed = int(text.rsplit(":", 1)[1])
    if proc.returncode != 0:
        run.problems.append(f"getscu exited {proc.returncode}")
    return run


_source_pixels: dict[Path, np.ndarray] = {}


def verify(run: GetRun, row: Row, out: Path, files: Sequence[Path], sops: list[str]) -> None:
    """Every SOP Instance UID of the study exactly once, in an expected syntax; the first and
    the last instance decode to the original pixels. Sets run.verified / run.problems."""
    count = len(files)
    if run.completed != count or run.failed:
        run.problems.append(f"getscu: {run.completed} completed, {run.failed} failed")
    got: dict[str, Path] = {}
    syntaxes: Counter[str] = Counter()
    received = [p for p in out.iterdir() if p.is_file()]
    run.received = len(received)
    for path in received:
        try:
            meta = read_file_meta_info(path)
        except Exception as exc:  # noqa: BLE001 - a broken file is a failed run
            run.problems.append(f"{path.name}: unreadable meta header: {exc}")
            continue
        got[str(meta.MediaStorageSOPInstanceUID)] = path
        syntaxes[str(meta.TransferSyntaxUID)] += 1
    if len(received) != count or set(got) != set(sops):
        missing = len(set(sops) - set(got))
        extra = len(set(got) - set(sops))
        run.problems.append(f"received {len(received)} files: {missing} missing, {extra} extra")
    unexpected = {ts: n for ts, n in syntaxes.items() if ts not in row.expect}
    if unexpected:
        run.problems.append(f"received in unexpected transfer syntaxes {unexpected}")
    for src, sop in ((files[0], sops[0]), (files[-1], sops[-1])):
        path = got.get(sop)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        if src not in _source_pixels:
            _source_pixels[src] = pydicom.dcmread(src).pixel_array
        original = _source_pixels[src]
        arr = ds.pixel_array
        if arr.dtype != original.dtype or not np.array_equal(arr, original):
            run.problems.append(f"{sop}: pixels differ from the original ({arr.dtype})")
        src_ds = pydicom.dcmread(src, stop_before_pixels=True)
        for kw in ("InstanceNumber", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
            if ds.get(kw) != src_ds.get(kw):
                run.problems.append(f"{sop}: {kw} {ds.get(kw)!r} != {src_ds.get(kw)!r}")
    run.verified = not run.problems


# --------------------------------------------------------------------------- profile


def profile_get(
    row: Row, server: Server, study: str, out: Path, logs: Path, top: int = 15
) -> list[str]:
    """One extra (uncounted) C-GET with py-spy attached to the server; top functions."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return [f"py-spy not found at {spy}"]
    raw = logs / "py-spy-raw.txt"
    cmd = [str(spy), "record", "--pid", str(server.pid), "--format", "raw", "--output", str(raw)]
    cmd += ["--rate", "200", "--nolineno", "--threads", "--subprocesses", "--nonblocking"]
    spy_log = open(logs / "py-spy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=spy_log, stderr=spy_log)
    try:
        time.sleep(1.5)  # attach
        run = run_get(row, server, study, out, logs / "getscu-profiled.log")
        time.sleep(0.3)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        spy_log.close()
    if not raw.exists():
        return [f"py-spy wrote nothing: {(logs / 'py-spy.log').read_text(errors='replace')}"]
    return [
        f"profiled run (py-spy 200 Hz, non-blocking, active samples only): {run.wall_s:.2f} s, "
        f"{len(list(out.iterdir()))} files; raw stacks: {raw} (kept with --keep)",
        *summarise_stacks(raw.read_text(errors="replace"), top, len(list(out.iterdir()))),
    ]


GENERIC_FRAMES = ("(threading.py)", "(socketserver.py)")  # on every stack: not worth a row


def summarise_stacks(text: str, top: int, images: int) -> list[str]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output,
    also as ms per image (200 Hz samples / images)."""
    self_n: Counter[str] = Counter()
    incl_n: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        # --threads --subprocesses: "process ...;thread (0x..);frames..."
        frames = [f for f in frames if not f.startswith("process ")]
        if frames and frames[0].startswith("thread "):
            threads[frames[0]] += count
            frames = frames[1:]
        if not frames:
            continue
        total += count
        self_n[frames[-1]] += count
        for frame in set(frames):
            incl_n[frame] += count
    if not total:
        return ["py-spy: no active samples"]
    per_img = 1000 / 200 / max(images, 1)  # ms per image of one sample
    out = [
        f"{total} active samples ({total / 200:.2f} s of running Python threads, "
        f"{total * per_img:.1f} ms per image)",
        "",
    ]
    out += ["| self % | ms/img | function |", "|---|---|---|"]
    out += [
        f"| {100 * n / total:.1f} | {n * per_img:.2f} | `{fn}` |"
        for fn, n in self_n.most_common(top)
    ]
    out += ["", "| inclusive % | ms/img | function |", "|---|---|---|"]
    inclusive = [(fn, n) for fn, n in incl_n.most_common() if not fn.endswith(GENERIC_FRAMES)]
    out += [
        f"| {100 * n / total:.1f} | {n * per_img:.2f} | `{fn}` |" for fn, n in inclusive[: top + 10]
    ]
    out += ["", "| samples % | thread |", "|---|---|"]
    out += [f"| {100 * n / total:.1f} | `{th}` |" for th, n in threads.most_common(6)]
    return out


# --------------------------------------------------------------------------- report


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def chosen(runs: list[GetRun]) -> tuple[list[GetRun], bool]:
    """The runs medians are taken over: verified ones on a quiet machine, else all verified
    ones (second value True: the machine was busy during every one)."""
    ok = [r for r in runs if r.counted]
    quiet = [r for r in ok if not r.busy]
    return (quiet, False) if quiet else (ok, bool(ok))


def rate(count: int, run: GetRun) -> float:
    return count / run.wall_s


def steady(count: int, run: GetRun) -> float | None:
    if run.first_s is None or run.last_s is None or run.last_s <= run.first_s:
        return None
    return (count - 1) / (run.last_s - run.first_s)


def per_run(values: list[tuple[GetRun, float | None]], digits: int = 1) -> str:
    parts = []
    for run, value in values:
        text = fmt(value, digits) if run.counted else "FAILED"
        parts.append(text + ("!" if run.busy and run.counted else ""))
    return " ".join(parts)


def table(results: dict[str, list[GetRun]], count: int, mb: float) -> str:
    head = [
        "C-GET from",
        "requestor accepts",
        "images/s",
        "per run",
        "MB/s",
        "first image ms",
        "per run",
        "first file seen ms",
        "steady images/s (first→last)",
        "peak RSS MB (idle before)",
        "server CPU ms/img",
        "verified runs",
    ]
    rows = [head, ["---"] * len(head)]
    for key, runs in results.items():
        if not runs:
            continue
        row = ROWS[key]
        use, busy_only = chosen(runs)
        images = median([rate(count, r) for r in use])
        first = median([1000 * r.first_s if r.first_s is not None else None for r in use])
        seen = median([1000 * r.first_file_s if r.first_file_s is not None else None for r in use])
        rss = median([r.peak_rss / 1e6 for r in use])
        idle = median([r.rss_before / 1e6 for r in use])
        cells = [
            f"{row.label}{' *' if busy_only else ''}",
            row.accepts,
            fmt(images),
            per_run([(r, rate(count, r)) for r in runs]),
            fmt(images * mb / count if images else None),
            fmt(first, 0),
            per_run([(r, 1000 * r.first_s if r.first_s is not None else None) for r in runs], 0),
            fmt(seen, 0),
            fmt(median([steady(count, r) for r in use])),
            f"{fmt(rss, 0)} ({fmt(idle, 0)})",
            fmt(median([1000 * r.cpu_server / count for r in use])),
            f"{sum(r.counted for r in runs)}/{len(runs)}",
        ]
        rows.append(cells)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    ours = median([rate(count, r) for r in chosen(results.get("compacs", []))[0]])
    theirs = median([rate(count, r) for r in chosen(results.get("orthanc", []))[0]])
    lines.append("")
    if ours and theirs:
        verdict = "met" if ours >= theirs else "NOT met"
        lines.append(
            f"compacs / Orthanc images/s (uncompressed requestor): {ours / theirs:.2f} "
            f"(target ≥ 1.00: {verdict})"
        )
        lines.append("")
    lines.append(
        "Medians over the verified runs during which other processes used < "
        f"{QUIET_CORES} cores (`!`: a busy run, `*`: no quiet run, median of all verified); "
        "FAILED: a run that failed verification, never counted. images/s = instances / "
        "(getscu start .. exit); first image = getscu start .. its first C-STORE response "
        "(file written)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=300, help="instances in the study (default 300)")
    p.add_argument("--repeat", type=int, default=3, help="C-GETs per row; median reported")
    p.add_argument(
        "--only",
        default=",".join(ROWS),
        help=f"rows to run (default all: {','.join(ROWS)})",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folders and logs")
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more compacs C-GET (uncompressed requestor, not counted) under py-spy",
    )
    common.add_wait_quiet(p)
    args = p.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.only if k not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {','.join(ROWS)}")
    if args.count < 2 or args.repeat < 1:
        p.error("--count must be >= 2 and --repeat >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.handle_signals()
    if not common.dicom_peers_ready("getscu"):
        return 2

    stamp, tmp = common.make_tmp("retrieve")
    logs = tmp / "logs"
    logs.mkdir()
    servers: dict[str, Server] = {}
    results: dict[str, list[GetRun]] = {k: [] for k in args.only}
    profile: list[str] = []
    try:
        t = time.perf_counter()
        study = pydicom.uid.generate_uid()
        files = dicomdata.ct_series(tmp / "input", args.count, study_uid=study)
        sops = [str(read_file_meta_info(f).MediaStorageSOPInstanceUID) for f in files]
        input_bytes = sum(f.stat().st_size for f in files)
        progress(
            f"made {len(files)} CT 512² files of one study, {input_bytes / 1e6:.1f} MB, "
            f"in {time.perf_counter() - t:.1f} s"
        )
        for name in dict.fromkeys(ROWS[k].server for k in args.only):
            server = SERVERS[name](tmp / name)
            servers[name] = server
            progress(f"starting {name} and storing the study ...")
            server.start_and_store(files)
            progress(f"    {server.setup_notes[-1]}")
        for server in servers.values():
            settle(server.pid)

        total, step = len(args.only) * args.repeat, 0
        for rep in range(args.repeat):  # interleaved: drift hits every row alike
            for key in args.only:
                step += 1
                row = ROWS[key]
                server = servers[row.server]
                settle(server.pid)
                if args.wait_quiet > 0:
                    wait_quiet(args.wait_quiet)
                out = tmp / "get" / f"{key}-run{rep + 1}"
                run = run_get(row, server, study, out, logs / f"getscu-{key}-run{rep + 1}.log")
                verify(run, row, out, files, sops)
                results[key].append(run)
                progress(
                    f"[{step}/{total}] {row.label}, accepts {row.accepts}: {run.received} files "
                    f"in {run.wall_s:.2f} s ({rate(args.count, run):.1f}/s), first image "
                    f"{fmt(1000 * run.first_s if run.first_s is not None else None, 0)} ms, "
                    f"peak RSS {run.peak_rss / 1e6:.0f} MB, "
                    f"others {run.others_cores:.2f} cores"
                    + ("" if run.counted else f"; FAILED: {'; '.join(run.problems)}")
                )
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        if args.profile and "compacs" in servers:
            progress("profiling one more compacs C-GET with py-spy ...")
            settle(servers["compacs"].pid)
            out = tmp / "get" / "compacs-profiled"
            profile = profile_get(ROWS["compacs"], servers["compacs"], study, out, logs)

        text = table(results, args.count, input_bytes / 1e6)
        print(text)
        problems: list[str] = []
        for server in servers.values():
            problems += server.log_problems()
        for line in problems:
            print(line)
        report = [
            f"# Retrieve (C-GET) benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- command: `{common.command_line()}`",
            f"- machine: {common.machine()}",
            f"- study: {args.count} CT 512² instances (dicomdata.ct_series), "
            f"{input_bytes / 1e6:.1f} MB uncompressed; repeat {args.repeat}, rows interleaved",
            "- requestor: DCMTK getscu -S, STUDY level, one association, default max PDU "
            "(16 KiB), TCP_NODELAY=1",
            f"- versions: {'; '.join(s.version() for s in servers.values())}; {dcmtk_version()}",
            *[f"- {note}" for s in servers.values() for note in s.setup_notes],
            "",
            text,
            "",
        ]
        for key, runs in results.items():
            for i, run in enumerate(runs):
                if run.problems:
                    report.append(f"- {key} run {i + 1}: {'; '.join(run.problems)}")
        if problems:
            report += ["- server log problems:", *[f"  {line}" for line in problems]]
        if profile:
            report += ["", "## Where compacs spends the C-GET (py-spy)", "", *profile]
            print("\n".join(profile))
        common.write_report("retrieve", stamp, report)
    finally:
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        common.cleanup(tmp, args.keep)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        sys.exit(130)
