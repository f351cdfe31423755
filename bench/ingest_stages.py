"""Where the CPU of a verified ingest goes: CPU ms per image by stage, node and workers.

The first step issue 23 asks for before anything is made faster: the node with its default
rules (JPEG-LS lossless, verified) receives ``--count`` CT 512² instances (the tests' real
slice, bench/ingest.py's data) over ``--associations`` DCMTK storescu associations at once,
until every object is in its stored form (``pending == 0``), twice per repeat:

1. **clean**: nothing attached; psutil's user+system CPU time of the node process and of its
   worker processes, before and after, per image. These are the totals reported.
2. **profiled**: py-spy samples the node and its workers (``--subprocesses``, non-blocking,
   on-CPU samples only); each sample is given to one stage by its Python stack (STAGES).
   A stage's CPU ms per image is its share of its process group's samples (node, or workers)
   times that group's CPU ms per image in the clean runs. A share survives a loaded machine
   better than wall time does; the profiled run's own CPU is reported to show what py-spy
   itself costs the node (its pauses and reads).

Beside the runs, in this process and one thread: CPU ms per 512² frame of pyjpegls and
imagecodecs' JPEG-LS encoders and decoders, and of splicing the fragments into the received
bytes against re-serialising with pydicom: what the GIL-free codec and splicing levers
would change, measured on the same frame.

Run: ``.venv/bin/python bench/ingest_stages.py [--count 500] [--associations 4]
[--repeat 1] [--keep]``. Report to bench/results/ingest-stages-<stamp>.md, plot (stacked
bar, CPU ms per image by stage, node and workers) beside it. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, from any cwd

import common  # noqa: E402
import dicomdata  # noqa: E402
import ingest  # noqa: E402  (bench/ingest.py: the receiver, the senders, one measured run)
import peers  # noqa: E402
from common import fmt, progress  # noqa: E402
from ingest import median  # noqa: E402

PYSPY_RATE = 200  # samples per second per thread; 500 images at ~70/s give ~1,400 per thread
PYSPY_START = 2.0  # s for py-spy to attach to the node and its workers before the senders

# --------------------------------------------------------------------------- stages

Frame = tuple[str, str]  # (function, full file name): "Archive.write", "/…/storage/archive.py"
Stack = list[Frame]  # root first


def _in(stack: Stack, files: Sequence[str], functions: Sequence[str] = ()) -> bool:
    """Whether a frame of `stack` is in one of `files` (path fragments) and, where
    `functions` are given, is one of them."""
    return any(
        any(f in file for f in files) and (not functions or func.rsplit(".", 1)[-1] in functions)
        for func, file in stack
    )


def _ingest(stack: Stack) -> bool:
    return _in(stack, ("service/ingest.py",), ("receive",))


def _worker(stack: Stack) -> bool:
    return _in(
        stack,
        ("service/compress_worker.py",),
        ("run_job", "_run_job", "run_arrival", "_compress_and_write"),
    )


def _leaf_is(stack: Stack, functions: set[str]) -> bool:
    return bool(stack) and stack[-1][0].rsplit(".", 1)[-1] in functions


# A thread sampled in one of these was waiting or had just been woken: on a loaded machine a
# woken thread stays runnable (and so "on CPU" to py-spy) until it gets a core. The index's
# Connections._write as the innermost frame is its process-wide write lock being taken.
WAITS = {"wait", "select", "acquire", "get", "_wait_for_tstate_lock", "poll", "sleep"}
# pynetdicom's two reactor loops per association (dul.py, association.py) sleep 1 ms per
# pass: a sample whose innermost Python frame is the loop itself is the loop going round.
POLLING = {"run_reactor", "_run_reactor", "ready", "_is_transport_event", "_check_received"}


# Checked in this order; a sample goes to the first stage whose test holds for its stack
# (the order puts the specific above the general: a checksum inside a durable write is
# hashing, an SQL statement inside recording a result is recording, and a wait is a wait
# wherever it is).
STAGES: list[tuple[str, Callable[[Stack], bool]]] = [
    (
        "waits / wake-ups",
        lambda s: _leaf_is(s, WAITS) or (_leaf_is(s, {"_write"}) and "index/" in s[-1][1]),
    ),
    ("record result (index)", lambda s: _in(s, ("service/jobs.py",), ("_record", "_finish"))),
    ("JPEG-LS encode", lambda s: _in(s, ("codecs/",), ("encode_frame",))),
    ("verify decode + compare", lambda s: _in(s, ("service/encode.py",), ("encoded_frames",))),
    (
        "hash",
        lambda s: _in(
            s,
            ("storage/archive.py", "service/ingest.py", "hashlib"),
            ("checksum", "file_checksums", "dataset_hash", "_file_hashes"),
        ),
    ),
    (
        "durable write",
        lambda s: _in(
            s, ("storage/archive.py",), ("write", "_commit", "adopt", "_fsync_dir", "_make_dirs")
        ),
    ),
    (
        "splice / serialise",
        lambda s: _in(
            s, ("service/encode.py",), ("_splice", "part10", "with_frames", "raw_layout")
        ),
    ),
    ("index: duplicate check", lambda s: _in(s, ("storage/index",), ("received_version",))),
    (
        "index: insert",
        lambda s: _ingest(s) and _in(s, ("storage/index", "sqlalchemy", "sqlite3", "psycopg")),
    ),
    ("pixel read (worker)", lambda s: _in(s, ("service/pixels.py",), ("source_frames",))),
    (
        "read blob (worker)",
        lambda s: (
            _in(s, ("storage/archive.py",), ("read", "open_checked"))
            or _in(s, ("service/handoff.py",), ("read",))
        ),
    ),
    ("parse + validate", lambda s: _ingest(s) or _worker(s)),
    (
        "queue / IPC",
        lambda s: _in(
            s, ("concurrent/futures", "multiprocessing", "service/jobs.py", "compress_worker.py")
        ),
    ),
    ("pynetdicom reactor polling", lambda s: _leaf_is(s, POLLING)),
    ("receive + DIMSE (pynetdicom)", lambda s: _in(s, ("pynetdicom",))),
    ("other", lambda s: True),
]
STAGE_NAMES = [name for name, _test in STAGES]


def stage_of(stack: Stack) -> str:
    return next(name for name, test in STAGES if test(stack))


def parse_frame(text: str) -> Frame:
    """``func (file:line)`` → (func, file); anything else (a thread or process label) is
    kept whole as the function."""
    if text.endswith(")") and " (" in text:
        func, _, where = text[:-1].rpartition(" (")
        return func, where.rsplit(":", 1)[0]
    return text, ""


def _committing(stack: Stack) -> bool:
    """An SQL COMMIT (SQLAlchemy's do_commit: SQLite's journal write and fsync): what group
    commit of index writes would share between several objects."""
    return _in(stack, ("sqlalchemy",), ("do_commit",))


def read_raw(path: Path, node_pid: int) -> dict[str, Counter[str]]:
    """py-spy's raw (collapsed stack) output: samples per stage, for "node" and "workers",
    and per stage the samples in an SQL COMMIT (keys "COMMIT <stage>").

    With ``--subprocesses`` each stack starts with ``process <pid>:"<command>"`` frames, the
    parent's before its child's; the last one is the process sampled. The node is the
    process the benchmark started, the rest are its workers (and their helpers)."""
    groups: dict[str, Counter[str]] = {"node": Counter(), "workers": Counter()}
    for line in path.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        parts = stack_text.split(";")
        labels = [p for p in parts if p.startswith("process ")]
        pid = labels[-1].split()[1].split(":")[0] if labels else str(node_pid)
        group = "node" if pid == str(node_pid) else "workers"
        stack = [parse_frame(p) for p in parts if not p.startswith("process ")]
        stage = stage_of(stack)
        groups[group][stage] += int(count)
        if _committing(stack):
            groups[group][f"COMMIT {stage}"] += int(count)
    return groups


# --------------------------------------------------------------------------- runs


class ProfiledCompacs(ingest.CompacsReceiver):
    """The node of bench/ingest.py's (e), with py-spy recording it and its workers from
    just before the senders start until every object is stored."""

    def __init__(self, workdir: Path, associations: int, raw: Path | None) -> None:
        super().__init__(workdir, associations)
        self.raw = raw
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self) -> peers.ManagedProcess:
        node = super().start()
        if self.raw is not None:
            common.settle(node.pid)  # the workers are up: --subprocesses sees them
            self.spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(node.pid),
                    "--subprocesses",
                    "--nonblocking",
                    "--full-filenames",
                    "--rate",
                    str(PYSPY_RATE),
                    "--format",
                    "raw",
                    "--output",
                    str(self.raw),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(self.raw.with_suffix(".log"), "wb"),  # noqa: SIM115
            )
            time.sleep(PYSPY_START)
        return node

    def wait_stored(self, run: ingest.Run, count: int, t0: float, input_bytes: int) -> None:
        super().wait_stored(run, count, t0, input_bytes)
        self.stop_spy()

    def stop_spy(self) -> None:
        """SIGINT: py-spy writes what it sampled and exits."""
        if self.spy is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.spy.send_signal(signal.SIGINT)
        try:
            self.spy.wait(60)
        except subprocess.TimeoutExpired:
            self.spy.kill()
            self.spy.wait()
        self.spy = None

    def stop(self) -> None:
        self.stop_spy()
        super().stop()


@dataclass
class Measured:
    node_ms: list[float] = field(default_factory=list)  # clean runs, CPU ms per image
    workers_ms: list[float] = field(default_factory=list)
    stored_per_s: list[float] = field(default_factory=list)
    profiled_node_ms: list[float] = field(default_factory=list)
    profiled_workers_ms: list[float] = field(default_factory=list)
    samples: dict[str, Counter[str]] = field(
        default_factory=lambda: {"node": Counter(), "workers": Counter()}
    )
    others_cores: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def one_run(
    files: list[Path], input_bytes: int, workdir: Path, associations: int, profile: bool
) -> tuple[ingest.Run, ProfiledCompacs, list[str]]:
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    raw = workdir / "pyspy.txt" if profile else None
    rec = ProfiledCompacs(workdir, associations, raw)
    run, problems = ingest.measure(rec, files, input_bytes, logs)
    return run, rec, problems


def run_all(args: argparse.Namespace, files: list[Path], input_bytes: int, tmp: Path) -> Measured:
    m = Measured()
    n = len(files)
    for rep in range(args.repeat):
        for profile in (False, True):
            kind = "profiled" if profile else "clean"
            workdir = tmp / f"{kind}-{rep + 1}"
            progress(f"[{rep + 1}/{args.repeat}] {kind}: {n} images, {args.associations} assocs")
            run, rec, problems = one_run(files, input_bytes, workdir, args.associations, profile)
            m.notes += [f"{kind} {rep + 1}: {p}" for p in [*run.notes, *problems]]
            if run.stored != n or run.stored_s != run.stored_s:
                m.notes.append(f"{kind} {rep + 1}: {run.stored}/{n} stored; run left out")
                continue
            node, workers = 1000 * run.cpu_main / n, 1000 * run.cpu_children / n
            progress(
                f"    stored/s {n / run.stored_s:.1f}, CPU ms/img node {node:.1f} + workers "
                f"{workers:.1f}; other processes {run.others_cores:.2f} cores"
            )
            if profile:
                m.profiled_node_ms.append(node)
                m.profiled_workers_ms.append(workers)
                assert rec.raw is not None
                if not rec.raw.exists():
                    log = rec.raw.with_suffix(".log")
                    m.notes.append(f"py-spy wrote nothing: {log.read_text(errors='replace')}")
                else:
                    for group, counts in read_raw(rec.raw, rec.node.pid if rec.node else 0).items():
                        m.samples[group].update(counts)
            else:
                m.node_ms.append(node)
                m.workers_ms.append(workers)
                m.stored_per_s.append(n / run.stored_s)
                m.others_cores.append(run.others_cores)
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    return m


def idle_cost(workdir: Path, associations: int, seconds: float = 4.0) -> dict[int, float]:
    """The node's CPU ms per second with 0 and with `associations` open associations that
    send nothing: what the node spends whether or not objects arrive (pynetdicom's reactor
    loops, timers). An ingest run pays it per second, not per image: the slower the run
    (a loaded machine), the more of it each image carries."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    rec = ProfiledCompacs(workdir, associations, None)
    node = rec.start()
    out: dict[int, float] = {}
    ae = AE(ae_title="STAGES")
    ae.add_requested_context(Verification)
    try:
        common.settle(node.pid)
        for count in (0, associations):
            assocs = [
                ae.associate(peers.LOOPBACK, node.port, ae_title="COMPACS") for _ in range(count)
            ]
            if not all(a.is_established for a in assocs):
                raise peers.PeerError("the node refused an idle association")
            time.sleep(0.5)
            before = common.tree_cpu(node.pid)[0]
            time.sleep(seconds)
            out[count] = 1000 * (common.tree_cpu(node.pid)[0] - before) / seconds
            for a in assocs:
                a.release()
    finally:
        rec.stop()
    return out


# --------------------------------------------------------------------------- in-process


def cpu_ms(fn: Callable[[], object], count: int) -> float:
    """CPU ms of this thread per call of `fn`, the best of three rounds of `count` calls
    (the least disturbed by other processes)."""
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        for _ in range(count):
            fn()
        best = min(best, (time.thread_time() - t) / count)
    return 1000 * best


def codec_costs(path: Path, count: int = 40) -> dict[str, float]:
    """CPU ms per 512² frame of each JPEG-LS library and of splicing against re-serialising,
    in this process: the costs the GIL-free codec and splicing levers trade."""
    from io import BytesIO

    import imagecodecs
    from pydicom import dcmread

    from compacs.codecs import registry
    from compacs.codecs.base import PixelFormat, to_unsigned_bits
    from compacs.service.encode import encode_dataset, raw_layout
    from compacs.service.pixels import source_frames

    raw = path.read_bytes()
    ds = dcmread(BytesIO(raw))
    frame = source_frames(ds)[0]
    pixel_format = PixelFormat.from_dataset(ds)
    codec = registry.get("jpegls")
    codestream = codec.encode_frame(frame, pixel_format)
    layout = raw_layout(raw, dcmread(BytesIO(raw)))
    costs = {
        "parse (dcmread, pixels not read)": cpu_ms(lambda: dcmread(BytesIO(raw)), count),
        "encode CharLS C API (the node's: codecs/charls_capi.py)": cpu_ms(
            lambda: codec.encode_frame(frame, pixel_format), count
        ),
        "encode pyjpegls (the same bytes, the plain path)": cpu_ms(
            lambda: codec.encode_pyjpegls(to_unsigned_bits(frame, pixel_format), pixel_format, 0),
            count,
        ),
        "encode imagecodecs": cpu_ms(
            lambda: imagecodecs.jpegls_encode(to_unsigned_bits(frame, pixel_format)), count
        ),
        "decode imagecodecs (the node's verify)": cpu_ms(
            lambda: codec.decode_frame(codestream, pixel_format), count
        ),
        "decode pyjpegls": cpu_ms(
            lambda: codec._decode_pyjpegls(codestream, pixel_format),  # noqa: SLF001
            count,
        ),
    }

    def encoded(splice: bool) -> Callable[[], object]:
        def run() -> object:
            fresh = dcmread(BytesIO(raw))
            frames = source_frames(fresh)
            return encode_dataset(fresh, codec, frames, {}, (raw, layout) if splice else None)

        return run

    whole = cpu_ms(encoded(False), count)
    spliced = cpu_ms(encoded(True), count)
    costs["read pixels + encode + verify + re-serialise (pydicom)"] = whole
    costs["read pixels + encode + verify + splice"] = spliced
    return costs


# --------------------------------------------------------------------------- report


def stage_ms(m: Measured) -> dict[str, dict[str, float]]:
    """CPU ms per image by group and stage: each group's clean CPU ms/img split by its
    samples' shares."""
    out: dict[str, dict[str, float]] = {}
    totals = {"node": median(m.node_ms) or 0.0, "workers": median(m.workers_ms) or 0.0}
    for group, counts in m.samples.items():
        total = sum(counts[stage] for stage in STAGE_NAMES)
        out[group] = {
            stage: totals[group] * counts[stage] / total
            for stage in [*STAGE_NAMES, *(f"COMMIT {s}" for s in STAGE_NAMES)]
            if total
        }
    return out


def stage_table(m: Measured) -> str:
    per = stage_ms(m)
    grand = sum(v.get(s, 0.0) for v in per.values() for s in STAGE_NAMES)
    rows = [
        "| stage | node ms/img | workers ms/img | total ms/img | share | of which SQL COMMIT "
        "| samples |",
        "|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        STAGE_NAMES, key=lambda s: -(per["node"].get(s, 0.0) + per["workers"].get(s, 0.0))
    )
    for stage in order:
        node, workers = per["node"].get(stage, 0.0), per["workers"].get(stage, 0.0)
        samples = m.samples["node"][stage] + m.samples["workers"][stage]
        if not samples:
            continue
        commit = per["node"].get(f"COMMIT {stage}", 0.0) + per["workers"].get(
            f"COMMIT {stage}", 0.0
        )
        rows.append(
            f"| {stage} | {fmt(node, 2)} | {fmt(workers, 2)} | {fmt(node + workers, 2)} | "
            f"{fmt(100 * (node + workers) / grand if grand else None)} % | "
            f"{fmt(commit, 2) if commit else ''} | {samples} |"
        )
    node_total = sum(per["node"].get(s, 0.0) for s in STAGE_NAMES)
    workers_total = sum(per["workers"].get(s, 0.0) for s in STAGE_NAMES)
    rows.append(
        f"| **all** | {fmt(node_total, 2)} | {fmt(workers_total, 2)} | "
        f"{fmt(node_total + workers_total, 2)} | 100 % | | "
        f"{sum(m.samples['node'][s] + m.samples['workers'][s] for s in STAGE_NAMES)} |"
    )
    return "\n".join(rows)


def plot(m: Measured, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = stage_ms(m)
    groups = ["node", "workers"]
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    bottoms = [0.0, 0.0]
    for i, stage in enumerate(STAGE_NAMES):
        values = [per.get(g, {}).get(stage, 0.0) for g in groups]
        if not any(values):
            continue
        ax.bar(groups, values, bottom=bottoms, label=stage, color=colours(i % 20))
        for j, v in enumerate(values):
            if v >= 0.8:
                ax.text(j, bottoms[j] + v / 2, f"{v:.1f}", ha="center", va="center", fontsize=7)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_ylabel("CPU ms per stored image")
    ax.set_title(
        "compacs ingest, default rules (JPEG-LS, verified): CPU per image by stage\n"
        f"CT 512², {sum(bottoms):.1f} ms/img in all (py-spy shares × psutil CPU)",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=500, help="instances to send (default 500)")
    p.add_argument("--associations", type=int, default=4, help="storescu at once (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="clean+profiled pairs; medians")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders, py-spy output")
    args = p.parse_args(argv)
    if args.count < 1 or args.repeat < 1 or args.associations < 1:
        p.error("--count, --associations and --repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.handle_signals()
    if not common.dicom_peers_ready("storescu"):
        return 2
    if not (Path(sys.executable).parent / "py-spy").exists():
        print(
            "py-spy is not installed in this environment: make .venv/.installed-test "
            "(the test extra of pyproject.toml brings it)",
            file=sys.stderr,
        )
        return 2
    stamp, tmp = common.make_tmp("ingest-stages")
    load_before = os.getloadavg()
    try:
        files = dicomdata.ct_series(tmp / "input", args.count)
        input_bytes = sum(f.stat().st_size for f in files)
        costs = codec_costs(files[0])
        idle = idle_cost(tmp / "idle", args.associations)
        m = run_all(args, files, input_bytes, tmp)
        load_after = os.getloadavg()
        node, workers = median(m.node_ms), median(m.workers_ms)
        stages = stage_table(m)
        cost_rows = ["| in-process, one thread | CPU ms per 512² frame |", "|---|---|"]
        cost_rows += [f"| {k} | {fmt(v, 2)} |" for k, v in costs.items()]
        summary = (
            f"clean runs: stored/s {fmt(median(m.stored_per_s))}, CPU ms/img node {fmt(node)} "
            f"+ workers {fmt(workers)} = {fmt((node or 0) + (workers or 0))}; profiled runs: "
            f"node {fmt(median(m.profiled_node_ms))} + workers "
            f"{fmt(median(m.profiled_workers_ms))} (py-spy's cost to the node)"
        )
        stored_s = 1 / (median(m.stored_per_s) or float("inf"))
        polling = idle[args.associations] - idle[0]
        idle_line = (
            f"idle node: {fmt(idle[0])} CPU ms/s with no association, "
            f"{fmt(idle[args.associations])} with {args.associations} open and silent: "
            f"{fmt(polling)} ms/s for the open associations, "
            f"{fmt(polling * stored_s)} ms per image at the clean runs' rate"
        )
        print(stages, "", summary, idle_line, "", "\n".join(cost_rows), sep="\n")
        png = common.RESULTS_DIR / f"ingest-stages-{stamp}.png"
        common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(m, png)
        report = [
            f"# Ingest stages {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- command: `{common.command_line()}`",
            f"- machine: {common.machine()}; load average before "
            f"{' '.join(f'{v:.2f}' for v in load_before)}, after "
            f"{' '.join(f'{v:.2f}' for v in load_after)}; other processes during the clean "
            f"runs: {', '.join(f'{c:.2f}' for c in m.others_cores)} cores",
            f"- input: {args.count} CT 512² ({input_bytes / 1e6:.1f} MB), "
            f"{args.associations} storescu associations, repeat {args.repeat}",
            f"- {summary}",
            f"- {idle_line}",
            f"- py-spy {PYSPY_RATE} Hz, --subprocesses --nonblocking, on-CPU samples only",
            f"- plot: `{png.relative_to(common.ROOT)}`",
            "",
            stages,
            "",
            "\n".join(cost_rows),
            "",
            *[f"- {note}" for note in m.notes],
        ]
        common.write_report("ingest-stages", stamp, report)
        progress(f"plot written to {png}")
    finally:
        common.cleanup(tmp, args.keep)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: receivers stopped", file=sys.stderr)
        sys.exit(130)
