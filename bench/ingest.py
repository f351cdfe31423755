"""Ingest benchmark: 500 CT 512² instances sent with DCMTK storescu into several receivers.

Receivers, side by side in one run (pick with --only):
  a  compacs, default rules (JPEG-LS lossless, verified), one storescu association
  b  Orthanc 1.10, IngestTranscoding = JPEG-LS lossless (1.2.840.10008.1.2.4.80)
  c  Orthanc 1.10, stored as received (uncompressed)
  d  DCMTK storescp writing the received files (the limit of this machine)
  e  compacs, default rules, 4 storescu associations at once (the files split in 4)
  f  compacs, default rules, 8 storescu associations at once
  g  Orthanc, IngestTranscoding JPEG-LS, 4 storescu associations at once
  h  Orthanc, IngestTranscoding JPEG-LS, 8 storescu associations at once
  i  compacs as e, but every object acknowledged as received and compressed afterwards
     ([ingest] compress_before_ack_from = 0; e compresses before the ack from 2 senders on)
  j  compacs as e, with one rule sending every object to HTJ2K lossless (verified)
``--processes 1,2,4`` runs every compacs receiver as ``compacs serve --processes N`` for each N.
``--postgres [ADMIN_URL]`` puts every index on PostgreSQL (default the machine's,
postgresql+psycopg://postgres@127.0.0.1:5432/postgres): compacs' ``index_url`` and Orthanc's
PostgreSQL index plugin (Debian ``orthanc-postgresql``, installed when missing), a new
database for each run, dropped after it; Orthanc's files stay in its storage folder.

Per receiver: "acked/s" (storescu start until it exits: every C-STORE answered) and
"stored/s" (storescu start until every object is in its final stored form: for compacs,
``compacs stats`` reports pending == 0; Orthanc and storescp store before they answer, so
there the two are the same), MB/s of uncompressed input (10^6 bytes), the stored ratio
(input bytes / bytes on disk) and the peak RSS of the receiver's process tree (the process
and all its children, summed, sampled every 50 ms).

Run: ``.venv/bin/python bench/ingest.py [--count 500] [--repeat 1] [--only a,b,c,d,e]
[--processes 1,2,4] [--keep]``. Table and plot (stored/s, CPU ms per image) to bench/results/.
A benchmark, not a test: nothing here asserts a speed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    tree_cpu,
    wait_quiet,
)

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
POLL_INTERVAL = 0.1  # s between compacs stats polls once storescu has exited
STOP_TIMEOUT = 75.0  # s a receiver may take to stop on SIGTERM before it gets SIGKILL


# --------------------------------------------------------------------------- DCMTK binaries


class DcmtkStorescp(peers.StorescpProcess):
    """The harness's storescp, started by absolute path (see :func:`dcmtk_tool`)."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[0] = dcmtk_tool("storescp")
        return cmd


# --------------------------------------------------------------------------- measuring


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# --------------------------------------------------------------------------- sending


def start_storescu(
    port: int, files: Sequence[Path], aec: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], Any]:
    """One storescu association for ``files`` (see :func:`common.storescu_args`), its log in
    ``log_path``."""
    args = common.storescu_args(port, aec, files)
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller after wait()
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=peers.dcmtk_env()
    )
    return proc, log


def split(files: Sequence[Path], n: int) -> list[list[Path]]:
    """``files`` in ``n`` contiguous groups of (nearly) equal size."""
    size, extra = divmod(len(files), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(list(files[start:end]))
        start = end
    return [g for g in groups if g]


# --------------------------------------------------------------------------- receivers


@dataclass
class Run:
    """One measured transfer into one receiver."""

    key: str
    acked_s: float = 0.0
    stored_s: float = 0.0
    ratio: float | None = None
    peak_rss: int = 0
    cpu_main: float = 0.0  # CPU seconds of the receiver process during the run
    cpu_children: float = 0.0  # and of its descendants (compacs' compression workers)
    others_cores: float = 0.0  # CPU used by processes outside this benchmark, in cores
    acked_ok: int = 0
    stored: int = 0
    notes: list[str] = field(default_factory=list)


class Receiver:
    key = "?"
    label = "?"
    associations = 1

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: peers.ManagedProcess | None = None
        self.index_url: str | None = None  # PostgreSQL (--postgres); None: the default

    def on_postgres(self, url: str) -> None:
        self.index_url = url
        self.label += ", PostgreSQL"

    @property
    def ae(self) -> str:
        return "ANY"

    def start(self) -> peers.ManagedProcess:
        raise NotImplementedError

    def wait_stored(self, run: Run, count: int, t0: float, input_bytes: int) -> None:
        """Fill run.stored_s, run.stored and run.ratio once every object is stored."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.graceful_teardown:
                self.proc.stop()
            else:
                self.proc.kill9()

    def version(self) -> str:
        return ""


class CompacsReceiver(Receiver):
    key = "a"
    label = "compacs (JPEG-LS, verified), 1 assoc"

    def __init__(self, workdir: Path, associations: int = 1, variant: str | None = None) -> None:
        super().__init__(workdir)
        self.associations = associations
        self.processes = 1  # serve --processes
        self.variant = variant  # a key of VARIANTS: a config beside the defaults
        if associations > 1:
            self.key = {4: "e", 8: "f"}.get(associations, "e")
            self.label = f"compacs (JPEG-LS, verified), {associations} assocs"
        if variant:
            self.key, what, _ = VARIANTS[variant]
            self.label = f"compacs ({what}), {associations} assocs"
        self.node: peers.CompacsProcess | None = None
        self._index: Any = None
        self.stats_source = "compacs stats CLI"
        self.rc: int | None = None
        self.stop_s = 0.0

    def serve_processes(self, count: int) -> None:
        """Run the node as `compacs serve --processes count`."""
        self.processes = count
        if count > 1:
            self.label += f", {count} processes"

    @property
    def ae(self) -> str:
        return "COMPACS"

    def start(self) -> peers.ManagedProcess:
        config = None
        if self.variant:
            config = self.workdir / "compacs.toml"
            config.write_text(VARIANTS[self.variant][2])
        self.node = peers.CompacsProcess(
            self.workdir / "data",
            ae_title="COMPACS",
            config=config,
            extra_args=("--processes", str(self.processes)),
            env={"COMPACS_INDEX_URL": self.index_url} if self.index_url else None,
        )
        self.proc = self.node
        self.node.start()
        self._open_index()
        return self.node

    def _open_index(self) -> None:
        """Read the node's index in-process, as ``compacs stats`` does, for cheap polling.

        Each ``compacs stats`` process costs ~0.5 s of CPU to start (imports), which on a
        small machine would slow the compression it is waiting for. The final numbers are
        still read with the CLI. Falls back to polling the CLI when this fails."""
        assert self.node is not None
        db = self.node.data_dir / "index.sqlite"
        try:
            from compacs.service.storage.index import Index

            if self.index_url:
                self._index = Index.open(self.index_url, check=None)
            elif not db.exists():
                raise FileNotFoundError(db)
            else:
                self._index = Index.open(f"sqlite:///{db.resolve()}", check=None)
            self._index.stats()
            self.stats_source = "in-process Index.stats() polling, final `compacs stats --json`"
        except Exception as exc:  # noqa: BLE001 - any failure: poll the CLI instead
            self._index = None
            self.stats_source = f"compacs stats CLI polling ({type(exc).__name__}: {exc})"

    def _stats(self) -> dict[str, Any]:
        if self._index is not None:
            return self._index.stats()
        assert self.node is not None
        return self.node.stats()

    def wait_stored(self, run: Run, count: int, t0: float, input_bytes: int) -> None:
        assert self.node is not None
        interval = POLL_INTERVAL if self._index is not None else 0.5
        deadline = time.monotonic() + max(300.0, count * 1.0)
        stats: dict[str, Any] = {}
        while True:
            try:
                stats = self._stats()
            except Exception as exc:  # noqa: BLE001 - report and keep polling
                run.notes.append(f"stats failed: {exc}")
                stats = {}
            if stats and stats["pending"] == 0 and stats["instances"] >= run.acked_ok:
                run.stored_s = time.perf_counter() - t0
                break
            if not self.node.running:
                run.notes.append(f"compacs exited with {self.node.returncode} while compressing")
                run.stored_s = float("nan")
                break
            if time.monotonic() > deadline:
                run.notes.append(f"still {stats.get('pending')} pending after the timeout")
                run.stored_s = float("nan")
                break
            time.sleep(interval)
        try:
            final = self.node.stats()  # the CLI's answer is the one reported
        except peers.PeerError as exc:
            run.notes.append(f"compacs stats CLI failed: {exc}")
            final = stats
        run.stored = int(final.get("instances", 0))
        if final.get("pending"):
            run.notes.append(f"{final['pending']} still pending")
        received, stored = final.get("bytes_received", 0), final.get("bytes_stored", 0)
        run.ratio = received / stored if stored else None
        if received and abs(received - input_bytes) > 0.05 * input_bytes:
            run.notes.append(f"bytes_received {received} vs input {input_bytes}")
        codecs = ", ".join(f"{k}: {v['instances']}" for k, v in final.get("by_codec", {}).items())
        if codecs:
            run.notes.append(f"codecs {codecs}")

    def stop(self) -> None:
        if self._index is not None:
            with contextlib.suppress(Exception):
                self._index.close()
            self._index = None
        if self.node is None:
            return
        t = time.perf_counter()
        self.rc = self.node.stop(timeout=STOP_TIMEOUT)
        self.stop_s = time.perf_counter() - t

    def version(self) -> str:
        return common.compacs_version()


class OrthancReceiver(Receiver):
    def __init__(self, workdir: Path, transcoding: str | None, associations: int = 1) -> None:
        super().__init__(workdir)
        self.transcoding = transcoding
        self.associations = associations
        self.key = {1: "b" if transcoding else "c", 4: "g", 8: "h"}[associations]
        self.label = RECEIVERS[self.key][0]
        self.orthanc: peers.OrthancProcess | None = None
        self._version = ""

    @property
    def ae(self) -> str:
        return "ORTHANC"

    def start(self) -> peers.ManagedProcess:
        self.orthanc = peers.OrthancProcess(
            self.workdir / "orthanc",
            ingest_transcoding=self.transcoding,
            extra_config=orthanc_postgresql_config(self.index_url) if self.index_url else None,
        )
        self.proc = self.orthanc
        self.orthanc.start()
        with contextlib.suppress(Exception):
            self._version = f"Orthanc {self.orthanc.get_json('/system')['Version']}"
        return self.orthanc

    def wait_stored(self, run: Run, count: int, t0: float, input_bytes: int) -> None:
        # Orthanc stores (and transcodes) before it answers the C-STORE.
        assert self.orthanc is not None
        run.stored_s = run.acked_s
        st = self.orthanc.statistics()
        run.stored = int(st["CountInstances"])
        disk = int(st["TotalDiskSize"])
        run.ratio = input_bytes / disk if disk else None
        if self.transcoding:
            ids = self.orthanc.instances()[:3]
            syntaxes = {self.orthanc.instance_transfer_syntax(i) for i in ids}
            if syntaxes != {self.transcoding}:
                run.notes.append(f"stored transfer syntaxes {sorted(syntaxes)}")

    def version(self) -> str:
        return self._version or "Orthanc"


class StorescpReceiver(Receiver):
    key = "d"
    label = "DCMTK storescp, raw files"

    def start(self) -> peers.ManagedProcess:
        self.scp = DcmtkStorescp(self.workdir / "storescp", aet="ANY-SCP")
        self.proc = self.scp
        self.scp.start()
        return self.scp

    def wait_stored(self, run: Run, count: int, t0: float, input_bytes: int) -> None:
        run.stored_s = run.acked_s  # written before the answer
        run.stored = len(self.scp.received())
        run.ratio = 1.0

    def version(self) -> str:
        return common.dcmtk_version("storescu")


# compacs beside its defaults: key, what the table says, the config file
VARIANTS = {
    "ack_first": (
        "i",
        "JPEG-LS, verified, acknowledged first",
        "[ingest]\ncompress_before_ack_from = 0\n",
    ),
    "htj2k": (
        "j",
        "HTJ2K hot, verified",
        '[[rules]]\nname = "hot"\nmatch = {}\ncodecs = ["htj2k"]\n',
    ),
}
COMPACS_KEYS = ("a", "e", "f", "i", "j")
RECEIVERS: dict[str, tuple[str, Callable[[Path], Receiver]]] = {
    "a": ("compacs, 1 association", lambda d: CompacsReceiver(d, 1)),
    "b": ("Orthanc, IngestTranscoding JPEG-LS", lambda d: OrthancReceiver(d, JPEG_LS_LOSSLESS)),
    "c": ("Orthanc, uncompressed", lambda d: OrthancReceiver(d, None)),
    "d": ("DCMTK storescp, raw files", lambda d: StorescpReceiver(d)),
    "e": ("compacs, 4 associations", lambda d: CompacsReceiver(d, 4)),
    "f": ("compacs, 8 associations", lambda d: CompacsReceiver(d, 8)),
    "g": ("Orthanc JPEG-LS, 4 associations", lambda d: OrthancReceiver(d, JPEG_LS_LOSSLESS, 4)),
    "h": ("Orthanc JPEG-LS, 8 associations", lambda d: OrthancReceiver(d, JPEG_LS_LOSSLESS, 8)),
    "i": (
        "compacs, 4 associations, acknowledged first (compress_before_ack_from = 0)",
        lambda d: CompacsReceiver(d, 4, "ack_first"),
    ),
    "j": (
        "compacs, 4 associations, every object to HTJ2K (a hot-codec rule)",
        lambda d: CompacsReceiver(d, 4, "htj2k"),
    ),
}


# --------------------------------------------------------------------------- PostgreSQL

PG_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class Databases:
    """A fresh database per run on one PostgreSQL server, dropped when the run is over."""

    def __init__(self, admin_url: str) -> None:
        import sqlalchemy

        self.admin_url = admin_url
        self.engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.made: list[str] = []

    def new(self, label: str) -> str:
        name = f"bench_{label}_{len(self.made)}_{os.getpid()}"
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        self.made.append(name)
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop_all(self) -> None:
        with self.engine.connect() as conn:
            for name in self.made:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.made.clear()
        self.engine.dispose()


def ensure_orthanc_postgresql() -> None:
    """Debian's orthanc-postgresql (Orthanc's PostgreSQL index plugin), installed if missing."""
    if PG_PLUGIN.exists():
        return
    with peers._file_lock(peers.STATE_DIR / "apt.lock"):
        if not PG_PLUGIN.exists():
            peers._apt_install(["orthanc-postgresql"])
    if not PG_PLUGIN.exists():
        raise peers.PeerError(f"{PG_PLUGIN} missing after apt-get install orthanc-postgresql")


def orthanc_postgresql_config(url: str) -> dict[str, Any]:
    """Orthanc ``extra_config``: its index in the database `url` names (GDCM kept)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return {
        "Plugins": [str(p) for p in (peers.GDCM_PLUGIN, PG_PLUGIN) if p.exists()],
        "PostgreSQL": {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": u.host or "127.0.0.1",
            "Port": u.port or 5432,
            "Database": u.database,
            "Username": u.username or "postgres",
            "Password": u.password or "",
            "Lock": False,
        },
    }


# --------------------------------------------------------------------------- one run


def measure(
    rec: Receiver, files: Sequence[Path], input_bytes: int, logs: Path, quiet: float = 0.0
) -> tuple[Run, list[str]]:
    """Start the receiver, send, wait until stored, stop it; (result, log problem lines)."""
    run = Run(rec.key)
    senders: list[tuple[subprocess.Popen[bytes], Any]] = []
    sampler: TreeSampler | None = None
    problems: list[str] = []
    try:
        proc = rec.start()
        settle(proc.pid)
        if quiet > 0:
            wait_quiet(quiet)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        groups = split(files, rec.associations)
        cpu0 = tree_cpu(proc.pid)
        busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
        t0 = time.perf_counter()
        for i, group in enumerate(groups):
            senders.append(start_storescu(proc.port, group, rec.ae, logs / f"storescu-{i}.log"))
        for sender, _log in senders:
            sender.wait()
        run.acked_s = time.perf_counter() - t0
        for i, (sender, log) in enumerate(senders):
            log.close()
            text = (logs / f"storescu-{i}.log").read_text(errors="replace")
            results = peers.parse_storescu_log(text)
            run.acked_ok += sum(1 for r in results.values() if r == "Success")
            if sender.returncode != 0:
                run.notes.append(f"storescu {i} exited {sender.returncode}")
            bad = [f"{Path(k).name}: {v}" for k, v in results.items() if v != "Success"]
            if bad:
                run.notes.append(f"storescu {i}: {len(bad)} not Success, e.g. {bad[0]}")
        rec.wait_stored(run, len(files), t0, input_bytes)
        cpu1 = tree_cpu(proc.pid)
        wall = time.perf_counter() - t0
        run.cpu_main, run.cpu_children = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        ours = run.cpu_main + run.cpu_children + own_cpu_seconds() - own0
        run.others_cores = max(0.0, (machine_busy_seconds() - busy0 - ours) / wall)
        if run.others_cores >= QUIET_CORES:
            run.notes.append(
                f"other processes used {run.others_cores:.2f} cores of {os.cpu_count()} "
                "during this run: the machine was not quiet"
            )
        run.peak_rss = sampler.stop()
        sampler = None
    finally:
        for sender, log in senders:
            if sender.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    sender.kill()
                sender.wait()
            log.close()
        if sampler is not None:
            sampler.stop()
        rec.stop()
        if isinstance(rec, CompacsReceiver) and rec.node is not None:
            n, lines = common.compacs_log_problems(rec.node.log_text())
            if n:
                problems = [f"{n} log lines with ERROR/WARNING/Traceback in {rec.node.log_path}"]
                problems += [f"    {line[:300]}" for line in lines]
            if rec.rc not in (0, None):
                problems.append(f"compacs exited with {rec.rc} on SIGTERM")
            if rec.stop_s > 5:
                problems.append(f"compacs took {rec.stop_s:.1f} s to stop on SIGTERM")
    return run, problems


# --------------------------------------------------------------------------- report


def label(key: str) -> str:
    """A result's name: its receiver's, and how many compacs processes served it."""
    receiver, _, processes = key.partition("/")
    return RECEIVERS[receiver][0] + (f", {processes[:-1]} processes" if processes else "")


def plot(results: dict[str, list[Run]], count: int, path: Path, index: str) -> None:
    """Stored/s and CPU ms per image of each result (medians of its runs), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, runs in results.items() if runs]
    stored = [median([count / r.stored_s for r in results[k] if r.stored_s]) or 0 for k in keys]
    cpu = [
        median([1000 * (r.cpu_main + r.cpu_children) / count for r in results[k]]) or 0
        for k in keys
    ]
    colours = ["tab:blue" if k[0] in "bcgh" else "tab:orange" for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [f"({k}) {label(k)}" for k in keys]
    left.barh(names, stored, color=colours)
    left.set_xlabel("stored images/s (higher is better)")
    right.barh(names, cpu, color=colours)
    right.set_xlabel("CPU ms per image, all processes\n(lower is better)")
    right.set_yticks(range(len(keys)), [""] * len(keys))
    for ax in (left, right):
        ax.invert_yaxis()
    fig.suptitle(
        f"Ingest of {count} CT 512² instances, index {index} (orange: compacs, blue: Orthanc)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v == v and v > 0]
    return statistics.median(vals) if vals else None


def table(results: dict[str, list[Run]], count: int, input_bytes: int, repeat: int) -> str:
    head = [
        "receiver",
        "acked/s",
        "stored/s",
        "MB/s acked",
        "MB/s stored",
        "stored ratio",
        "peak RSS MB",
        "CPU ms/img (main+children)",
        "ok (acked/stored)",
    ]
    if repeat > 1:
        head.append("stored/s per run")
    rows = [head, ["---"] * len(head)]
    mb = input_bytes / 1e6
    for key, all_runs in results.items():
        if not all_runs:
            continue
        # Medians over the runs on a quiet machine; all runs only where none was quiet.
        runs = [r for r in all_runs if r.others_cores < QUIET_CORES] or all_runs
        busy_only = runs is all_runs and any(r.others_cores >= QUIET_CORES for r in runs)
        acked = median([count / r.acked_s for r in runs if r.acked_s])
        stored = median([count / r.stored_s for r in runs if r.stored_s])
        ratio = median([r.ratio for r in runs if r.ratio])
        rss = median([r.peak_rss / 1e6 for r in runs])
        ok = f"{min(r.acked_ok for r in all_runs)}/{min(r.stored for r in all_runs)} of {count}"
        cpu_main = median([1000 * r.cpu_main / count for r in runs])
        cpu_children = median([1000 * r.cpu_children / count for r in runs]) or 0.0
        cpu = f"{fmt(cpu_main)}" + (f"+{fmt(cpu_children)}" if cpu_children else "")
        row = [
            f"({key}) {label(key)}{' *' if busy_only else ''}",
            fmt(acked),
            fmt(stored),
            fmt(acked * mb / count if acked else None),
            fmt(stored * mb / count if stored else None),
            fmt(ratio, 2),
            fmt(rss, 0),
            cpu,
            ok,
        ]
        if repeat > 1:
            row.append(
                " ".join(
                    fmt(count / r.stored_s if r.stored_s else None)
                    + ("!" if r.others_cores >= QUIET_CORES else "")
                    for r in all_runs
                )
            )
        rows.append(row)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        f"Medians over the runs during which other processes used < {QUIET_CORES} cores; "
        "`*`: no such run, median of all runs; `!`: a run on a busy machine.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=500, help="instances to send (default 500)")
    p.add_argument("--repeat", type=int, default=1, help="runs per receiver; median reported")
    p.add_argument("--only", default="a,b,c,d,e", help="receivers to run, e.g. a,d (default all)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders and logs")
    p.add_argument(
        "--processes",
        default="1",
        help="compacs serve --processes N; a list (1,2,4) runs each compacs receiver with each",
    )
    p.add_argument(
        "--postgres",
        nargs="?",
        const=PG_ADMIN_URL,
        metavar="ADMIN_URL",
        help=f"every index on PostgreSQL, a new database per run (default {PG_ADMIN_URL})",
    )
    common.add_wait_quiet(p)
    args = p.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.only if k not in RECEIVERS]
    if unknown:
        p.error(f"unknown receiver(s) {unknown}; choose from {','.join(RECEIVERS)}")
    if args.count < 1 or args.repeat < 1:
        p.error("--count and --repeat must be >= 1")
    try:
        args.processes = [int(n) for n in str(args.processes).split(",") if n.strip()]
    except ValueError:
        p.error(f"--processes {args.processes!r}: give a count or a list such as 1,2,4")
    if not args.processes or min(args.processes) < 1:
        p.error("--processes: counts of 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.handle_signals()
    if not common.dicom_peers_ready("storescu"):
        return 2

    databases = None
    if args.postgres:
        ensure_orthanc_postgresql()
        databases = Databases(args.postgres)
    stamp, tmp = common.make_tmp("ingest")
    plan = [  # (result key, receiver key, compacs processes)
        (key if n == 1 else f"{key}/{n}p", key, n)
        for key in args.only
        for n in (args.processes if key in COMPACS_KEYS else [1])
    ]
    results: dict[str, list[Run]] = {k: [] for k, _, _ in plan}
    problems: dict[str, list[str]] = {}
    versions: dict[str, str] = {}
    stats_source = ""
    try:
        t = time.perf_counter()
        files = dicomdata.ct_series(tmp / "input", args.count)
        input_bytes = sum(f.stat().st_size for f in files)
        progress(
            f"made {len(files)} CT 512² files, {input_bytes / 1e6:.1f} MB, "
            f"in {time.perf_counter() - t:.1f} s ({tmp / 'input'})"
        )
        total = len(plan) * args.repeat
        step = 0
        for rep in range(args.repeat):  # interleaved: drift hits every receiver alike
            for key, receiver, processes in plan:
                step += 1
                workdir = tmp / f"{key.replace('/', '-')}-run{rep + 1}"
                logs = workdir / "logs"
                logs.mkdir(parents=True)
                rec = RECEIVERS[receiver][1](workdir)
                if isinstance(rec, CompacsReceiver):
                    rec.serve_processes(processes)
                if databases is not None and not isinstance(rec, StorescpReceiver):
                    rec.on_postgres(databases.new(key.replace("/", "_")))
                progress(f"[{step}/{total}] ({key}) {rec.label} ...")
                try:
                    run, found = measure(rec, files, input_bytes, logs, args.wait_quiet)
                except peers.PeerError as exc:
                    progress(f"    ({key}) failed to run: {exc}")
                    problems.setdefault(key, []).append(f"run {rep + 1} failed: {exc}")
                    continue
                results[key].append(run)
                versions.setdefault(receiver, rec.version())
                if isinstance(rec, CompacsReceiver):
                    stats_source = rec.stats_source
                if found:
                    problems.setdefault(key, []).extend(f"run {rep + 1}: {p}" for p in found)
                stored = ""
                if run.stored_s != run.acked_s:
                    rate = fmt(args.count / run.stored_s)
                    stored = f", all stored at {run.stored_s:.2f} s ({rate}/s)"
                progress(
                    f"    ({key}) {run.acked_ok}/{args.count} acked in {run.acked_s:.2f} s "
                    f"({args.count / run.acked_s:.1f}/s){stored}; ratio {fmt(run.ratio, 2)}, "
                    f"peak RSS {run.peak_rss / 1e6:.0f} MB"
                    + (f"; {'; '.join(run.notes)}" if run.notes else "")
                )
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)

        text = table(results, args.count, input_bytes, args.repeat)
        print(text)
        report = [
            f"# Ingest benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- command: `{common.command_line()}`",
            f"- machine: {common.machine()}",
            f"- input: {args.count} CT 512² instances (dicomdata.ct_series), "
            f"{input_bytes / 1e6:.1f} MB uncompressed; repeat {args.repeat}",
            "- sender: DCMTK storescu -R -nh, TCP_NODELAY=1, one association each "
            "((e): 4 at once); MB = 10^6 bytes of uncompressed input",
            f"- versions: {'; '.join(sorted(set(versions.values())))}",
            "- index: "
            + (
                f"PostgreSQL at {args.postgres.rsplit('@', 1)[-1]}, a new database per run"
                if args.postgres
                else "SQLite (compacs' default; Orthanc's own)"
            ),
        ]
        if stats_source:
            report.append(f'- compacs "stored": pending == 0, read by {stats_source}')
        report += ["", text, ""]
        for key, runs in results.items():
            for i, run in enumerate(runs):
                if run.notes:
                    report.append(f"- ({key}) run {i + 1}: {'; '.join(run.notes)}")
        for key, lines in problems.items():
            report.append(f"- ({key}) problems:")
            report += [f"  {line}" for line in lines]
        for key, lines in problems.items():
            print("\n".join(f"({key}) {line}" for line in lines))
        png = common.RESULTS_DIR / f"ingest-{stamp}.png"
        common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(results, args.count, png, "PostgreSQL" if args.postgres else "SQLite")
        report += ["", f"Plot: `{png.relative_to(common.ROOT)}`"]
        print(f"plot written to {png}")
        common.write_report("ingest", stamp, report)
    finally:
        common.cleanup(tmp, args.keep)
        if databases is not None:
            databases.drop_all()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: receivers stopped", file=sys.stderr)
        sys.exit(130)
