"""What every benchmark in bench/ needs: the test harness on sys.path, DCMTK tools found
outside the virtual environment, process-tree RSS/CPU sampling, waiting for a quiet machine,
the machine description and the results file, signal handling and cleanup.

The scripts import it with the bench folder put first on sys.path, so that they run from any
working directory: ``.venv/bin/python bench/<name>.py``. Importing it also makes the harness
modules of tests/ (``peers``, ``dicomdata``, ``nodecheck``) importable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
# tests/ has no __init__.py: import the harness modules the way tests/conftest.py does.
sys.path.insert(0, str(ROOT / "tests"))

import peers  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
SAMPLE_INTERVAL = 0.05  # s between RSS samples
QUIET_CORES = 0.15  # a run is "quiet" when other processes used less CPU than this


# --------------------------------------------------------------------------- DCMTK binaries


def dcmtk_tool(name: str) -> str:
    """The DCMTK binary ``name`` from PATH, skipping the virtual environment: pynetdicom
    installs apps of the same names (storescu, storescp, getscu, findscu) into .venv/bin,
    which would shadow DCMTK's when the venv is activated."""
    venv = Path(sys.prefix).resolve()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        cand = Path(entry) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            with contextlib.suppress(OSError):
                if not cand.resolve().is_relative_to(venv):
                    return str(cand)
    fallback = Path("/usr/bin") / name
    if fallback.exists():
        return str(fallback)
    raise peers.PeerError(f"DCMTK {name} not found (apt-get install dcmtk)")


def dcmtk_version(name: str) -> str:
    """The first line of ``<name> --version`` (e.g. ``$dcmtk: storescu v3.6.7 ... $``)."""
    res = subprocess.run(
        [dcmtk_tool(name), "--version"], capture_output=True, text=True, check=False
    )
    first = (res.stdout or res.stderr).strip().splitlines()
    return first[0].strip() if first else "DCMTK"


def storescu_args(port: int, aec: str, files: Sequence[Path]) -> list[str]:
    """One storescu association for ``files`` (uncompressed proposals, -R, -nh, -v): the same
    flags as the harness's peers.storescu()."""
    args = [dcmtk_tool("storescu"), "-v", "-R", "-nh", "-aet", "STORESCU", "-aec", aec]
    args += [peers.LOOPBACK, str(port), *map(str, files)]
    return args


def dicom_peers_ready(tool: str) -> bool:
    """The Debian DICOM peers (Orthanc, DCMTK) and DCMTK ``tool`` are there; says why not."""
    try:
        peers.ensure_debian_packages()
        dcmtk_tool(tool)
    except peers.PeerError as exc:
        print(f"DICOM peers unavailable: {exc}", file=sys.stderr)
        return False
    return True


# --------------------------------------------------------------------------- measuring


class TreeSampler(threading.Thread):
    """Peak RSS of a process plus all its descendants, summed, sampled every 50 ms.

    The list of descendants is refreshed every 10th sample (walking /proc costs ~2.5 ms);
    each sample reads every known process's RSS.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()
        self._procs: list[psutil.Process] = [self.root]

    def _refresh(self) -> None:
        with contextlib.suppress(psutil.Error):
            self._procs = [self.root, *self.root.children(recursive=True)]

    def sample(self) -> int:
        if self.samples % 10 == 0:
            self._refresh()
        total = 0
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        self.samples += 1
        self.peak = max(self.peak, total)
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        self._refresh()
        self.sample()
        return self.peak


def tree_rss(pid: int) -> int:
    """RSS of a process plus all its live descendants, summed, now."""
    total = 0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
    return total


def tree_cpu(pid: int) -> tuple[float, float]:
    """User+system CPU seconds of a process, and of all its live descendants together."""
    own = children = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        t = root.cpu_times()
        own = t.user + t.system
        for proc in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                children += t.user + t.system
    return own, children


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and all its live descendants."""
    return sum(tree_cpu(pid))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, not idle/iowait) since boot."""
    t = psutil.cpu_times()
    not_busy = ("idle", "iowait", "guest", "guest_nice")  # guest is counted in user already
    return sum(t) - sum(getattr(t, name, 0.0) for name in not_busy)


def own_cpu_seconds() -> float:
    """CPU seconds of this benchmark process and its reaped children (DCMTK tools, CLIs)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def settle(pid: int, timeout: float = 20.0) -> None:
    """Wait until the server tree is idle (<4 % of a core over 0.25 s): a node whose worker
    processes are still importing codecs would otherwise steal CPU from the measured run."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = tree_cpu_seconds(pid)
        if now - last < 0.01:
            return
        last = now


def wait_quiet(limit: float, window: float = 2.0, threshold: float = 0.1) -> float:
    """Wait (up to ``limit`` s) for a ``window`` in which the whole machine used less than
    ``threshold`` cores: other jobs on a shared machine skew every run. Returns the busy
    cores of the last window."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        cores = (machine_busy_seconds() - before) / window
        if cores < threshold or time.monotonic() >= deadline:
            return cores


def add_wait_quiet(parser: argparse.ArgumentParser) -> None:
    """The ``--wait-quiet S`` option (see :func:`wait_quiet`)."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S s for the machine to be idle (shared machines)",
    )


# --------------------------------------------------------------------------- compacs


def compacs_log_problems(text: str, limit: int = 8) -> tuple[int, list[str]]:
    """Lines in a compacs log that look like trouble: ERROR/CRITICAL/WARNING/Traceback."""
    keys = ("ERROR", "CRITICAL", "WARNING", "Traceback", "Exception")
    hits = [line for line in text.splitlines() if any(k in line for k in keys)]
    return len(hits), hits[:limit]


def compacs_version() -> str:
    try:
        from importlib.metadata import version

        return f"compacs {version('compacs')}"
    except Exception:  # noqa: BLE001
        return "compacs"


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def machine(memory: bool = True) -> str:
    """``host: N CPUs (model)``, with the memory in GiB unless ``memory`` is False."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    text = f"{platform.node()}: {os.cpu_count()} CPUs ({model or platform.machine()})"
    if memory:
        text += f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    return text


def command_line() -> str:
    """How this benchmark was started, for the report."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_report(name: str, stamp: str, lines: list[str]) -> Path:
    """``lines`` to bench/results/<name>-<stamp>.md; says where on stderr."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    progress(f"written to {path}")
    return path


# --------------------------------------------------------------------------- lifecycle


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: every server is stopped by PID


def handle_signals() -> None:
    """SIGTERM and SIGINT unwind through the finally blocks. Even where the shell started us
    with SIGINT ignored (a background job), Ctrl-C / kill -INT must stop the servers rather
    than leave them running."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def make_tmp(name: str) -> tuple[str, Path]:
    """The run's time stamp and a fresh temporary folder for benchmark ``name``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return stamp, Path(tempfile.mkdtemp(prefix=f"compacs-bench-{name}-{stamp}-"))


def cleanup(tmp: Path, keep: bool) -> None:
    """Kill what the harness started (by PID) and remove ``tmp`` unless ``keep``."""
    peers.kill_leftovers()
    if keep:
        progress(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
