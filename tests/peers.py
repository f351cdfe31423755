"""Real peers for the integration tests: the compacs service, DCMTK tools and Orthanc.

Everything here starts real processes on loopback, on free ports, and stops them by PID.
No pytest import: the helpers also serve benchmarks and manual debugging sessions.

Facts that shaped this module (see docs/design.md, "Real peers"):
- every DCMTK-based process (storescu, storescp, Orthanc) gets TCP_NODELAY=1, or each
  C-STORE waits ~40 ms for Nagle;
- storescu exits 0 even when a store fails under ``-nh``: read the per-file results from its
  verbose log (:func:`parse_storescu_log`), never only the return code;
- Orthanc 1.10 listens on 0.0.0.0 whatever we ask, so ports are checked on all interfaces;
- Orthanc's web server threads need bigger stacks for JPEG 2000 transcoding (LD_PRELOAD shim).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import io
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DEBIAN_PACKAGES = ("dcmtk", "orthanc", "orthanc-gdcm", "orthanc-dicomweb")
# Per-user scratch shared by all test sessions: apt lock, compiled shim, PID records.
STATE_DIR = Path(tempfile.gettempdir()) / f"compacs-tests-{os.getuid()}"

# storescu flag that proposes a compressed transfer syntax (plus all uncompressed ones).
STORESCU_TS_FLAGS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


class PeerError(RuntimeError):
    """A peer could not be installed, started or reached; the message carries its log tail."""


# --------------------------------------------------------------------------- packages

_packages_checked = False
_install_error: str | None = None


def missing_debian_packages() -> list[str]:
    """Which of dcmtk/orthanc/orthanc-gdcm/orthanc-dicomweb are absent, judged by the files
    the tests use."""
    missing = []
    if shutil.which("storescu") is None:
        missing.append("dcmtk")
    if not ORTHANC_BIN.exists():
        missing.append("orthanc")
    if not GDCM_PLUGIN.exists():
        missing.append("orthanc-gdcm")
    if not DICOMWEB_PLUGIN.exists():
        missing.append("orthanc-dicomweb")
    return missing


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise concurrent test sessions (e.g. two pytest runs) around one action."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_debian_packages() -> None:
    """Install dcmtk, orthanc and orthanc-gdcm with apt-get when missing (CI machines).

    Cheap after the first call: a module flag, then a file check. A failed install is
    remembered for the session so that each test does not retry apt-get.
    """
    global _packages_checked, _install_error
    if _packages_checked and not missing_debian_packages():
        return
    if _install_error is not None:
        raise PeerError(_install_error)
    with _file_lock(STATE_DIR / "apt.lock"):
        if missing_debian_packages():
            try:
                _apt_install(DEBIAN_PACKAGES)
            except (OSError, subprocess.SubprocessError) as exc:
                _install_error = f"apt-get install {' '.join(DEBIAN_PACKAGES)} failed: {exc}"
                raise PeerError(_install_error) from exc
        still = missing_debian_packages()
        if still:
            _install_error = f"still missing after apt-get install: {', '.join(still)}"
            raise PeerError(_install_error)
    _packages_checked = True


def _apt_install(packages: Sequence[str]) -> None:
    """apt-get update + install, non-interactive; keeps Debian's postinst from starting
    a system-wide Orthanc on 4242/8042 (policy-rc.d 101, removed afterwards)."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if os.geteuid() == 0 and not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        for cmd in (
            [*sudo, "apt-get", "update", "-qq"],
            [*sudo, "apt-get", "install", "-y", "-qq", *packages],
        ):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            if res.returncode != 0:
                raise subprocess.SubprocessError(
                    f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}"
                )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


# --------------------------------------------------------------------------- ports

_issued_ports: set[int] = set()
_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """True when nothing listens on the port on any interface (Orthanc binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port that is free now, never handed out before in this process.

    Picked below the kernel's ephemeral range so that the outgoing connections of
    storescu/Orthanc cannot take it between this call and the server's bind.
    """
    high = _ephemeral_low() - 1
    low = max(1025, high - 12000)
    if high - low > 1000:
        for _ in range(500):
            port = _rng.randint(low, high)
            if port not in _issued_ports and _bindable(port):
                _issued_ports.add(port)
                return port
    for _ in range(100):  # fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port
    raise PeerError("no free TCP port found")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path | str | None, lines: int = 40) -> str:
    """Last lines of a log file, for error messages; empty when it does not exist."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 60.0,
    proc: subprocess.Popen[Any] | None = None,
    log_path: Path | str | None = None,
) -> None:
    """Block until host:port accepts connections.

    Raises PeerError with the log tail as soon as ``proc`` exits (no waiting out the
    timeout on a crash), or when the timeout passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(
                f"process {proc.pid} exited with {proc.returncode} before listening on "
                f"{host}:{port}; log tail ({log_path}):\n{tail(log_path)}"
            )
        if port_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise PeerError(
                f"nothing listens on {host}:{port} after {timeout:.0f} s; "
                f"log tail ({log_path}):\n{tail(log_path)}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- PIDs


def pid_alive(pid: int) -> bool:
    """True when the PID exists and is not a zombie (a zombie still answers kill 0)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_time(pid: int) -> str | None:
    """Kernel start time of a PID: tells a recorded process from a later one that reused it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_pid(pid: int, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal a process that is not our child, wait for it to vanish, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_PID_DIR = STATE_DIR / "pids"
_live: dict[int, ManagedProcess] = {}


def _record_pid(pid: int) -> None:
    """Write PID, its start time and its owner (this test process) to the shared PID dir."""
    start = _start_time(pid)
    if start is not None:
        _PID_DIR.mkdir(parents=True, exist_ok=True)
        owner = f"{os.getpid()} {_start_time(os.getpid())}"
        (_PID_DIR / str(pid)).write_text(f"{start} {owner}\n")


def _forget_pid(pid: int) -> None:
    (_PID_DIR / str(pid)).unlink(missing_ok=True)


def _same_process(pid: int, start: str) -> bool:
    return pid_alive(pid) and _start_time(pid) == start


def reap_stale_pids() -> list[int]:
    """SIGKILL the process groups that an earlier, crashed test session left running.

    A recorded peer is killed only when its own start time still matches (not a reused
    PID) and the test process that started it is gone: a test session running beside this
    one keeps its peers.
    """
    killed: list[int] = []
    if not _PID_DIR.is_dir():
        return killed
    for rec in _PID_DIR.iterdir():
        try:
            pid = int(rec.name)
            start, owner, owner_start = rec.read_text().split()
            owner_pid = int(owner)
        except (ValueError, OSError):
            rec.unlink(missing_ok=True)
            continue
        if pid in _live or (owner_pid != os.getpid() and _same_process(owner_pid, owner_start)):
            continue
        if _same_process(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        rec.unlink(missing_ok=True)
    return killed


def kill_leftovers() -> list[int]:
    """SIGKILL every peer this process started and did not stop (session teardown, atexit)."""
    pids = list(_live)
    for pid in pids:
        proc = _live.get(pid)
        if proc is not None:
            proc.kill9()
    return pids


atexit.register(kill_leftovers)


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for DCMTK-based processes: TCP_NODELAY=1, or ~40 ms per C-STORE."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


class ManagedProcess:
    """A server process in its own session, logged to a file, stopped by PID.

    Its own session (setsid) keeps a Ctrl-C of the test runner from reaching it, and lets
    teardown kill its whole process group (worker processes included) by the leader's PID.
    """

    name = "process"
    # Fixture teardown: SIGTERM and wait (True), or SIGKILL at once for throw-away peers.
    graceful_teardown = True
    # What stop() sends first (PostgreSQL's SIGTERM waits for its clients to leave).
    stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path, start_timeout: float = 60.0) -> None:
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._orphan_groups: list[int] = []
        self.host = LOOPBACK
        self.port = 0

    # subclasses provide these
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dcmtk_env()

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_for_port(self.host, self.port, self.start_timeout, self.proc, self.log_path)

    def popen_options(self) -> dict[str, Any]:
        """Extra subprocess.Popen arguments (the user to run as, for a server refusing root)."""
        return {}

    # lifecycle
    @property
    def pid(self) -> int:
        if self.proc is None:
            raise PeerError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self) -> ManagedProcess:
        """Start (again, after stop/kill9) and wait until it listens; raise with the log tail."""
        if self.running:
            raise PeerError(f"{self.name} already running as PID {self.pid}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.log_path.parent,
                start_new_session=True,
                **self.popen_options(),
            )
        _live[self.proc.pid] = self
        _record_pid(self.proc.pid)
        try:
            self.wait_ready()
        except BaseException:
            self.kill9()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (``stop_signal``), wait up to ``timeout``, then SIGKILL; reap; kill group
        stragglers."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with open(self.log_path, "ab") as log:
                    log.write(f"=== not stopped after {timeout} s: SIGKILL\n".encode())
                proc.kill()
                proc.wait()
        self._finish(proc.pid)
        return proc.returncode

    def kill9(self, group: bool = True) -> None:
        """SIGKILL, as a power cut would: the whole process group unless ``group`` is False."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        if group:
            self._finish(proc.pid)
        else:  # its surviving workers are killed by the next stop()/kill9()
            self._orphan_groups.append(proc.pid)

    def _finish(self, pid: int) -> None:
        """Kill what is left of the process group(s) (e.g. orphaned workers), forget PIDs."""
        for gid in (*self._orphan_groups, pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(gid, signal.SIGKILL)
            _live.pop(gid, None)
            _forget_pid(gid)
        self._orphan_groups.clear()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> ManagedProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- compacs


class CompacsProcess(ManagedProcess):
    """The compacs service as a real process: ``python -m compacs.service.cli serve``."""

    name = "compacs"

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        ae_title: str = "COMPACS",
        host: str = LOOPBACK,
        config: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(
            Path(log_path)
            if log_path
            else self.data_dir.parent / f"compacs-{self.data_dir.name}.log",
            start_timeout,
        )
        self.port = port or free_port()
        self.host = host
        self.ae_title = ae_title
        self.config = Path(config) if config else None
        self.env_overrides = dict(env or {})
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "compacs.service.cli", "serve"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        cmd += ["--data", str(self.data_dir), "--host", self.host, "--port", str(self.port)]
        cmd += ["--ae-title", self.ae_title, *self.extra_args]
        return cmd

    def environment(self) -> dict[str, str]:
        """Inherited COMPACS_* variables are dropped: a developer's COMPACS_INDEX_URL must
        never point a test node at a real database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACS_")}
        env.update(TCP_NODELAY="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        env.update(self.env_overrides)
        return env

    def cli(
        self, *args: str, timeout: float = 600.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m compacs.service.cli ARGS`` (stats/export/verify), output captured."""
        run_env = self.environment()
        if env:
            run_env.update(env)
        return subprocess.run(
            [sys.executable, "-m", "compacs.service.cli", *args],
            capture_output=True,
            text=True,
            env=run_env,
            cwd=self.log_path.parent,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def stats(self) -> dict[str, Any]:
        """``compacs stats --data DIR --json`` parsed; raises with stderr when it fails."""
        res = self.cli("stats", "--data", str(self.data_dir), "--json")
        if res.returncode != 0:
            raise PeerError(f"compacs stats exited {res.returncode}:\n{res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def verify(self) -> subprocess.CompletedProcess[str]:
        return self.cli("verify", "--data", str(self.data_dir))

    def export(
        self,
        out_dir: Path | str,
        *,
        study: str | None = None,
        series: str | None = None,
        transfer_syntax: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``compacs export``; neither study nor series given means ``--all``."""
        args = ["export", "--data", str(self.data_dir)]
        if study:
            args += ["--study", study]
        elif series:
            args += ["--series", series]
        else:
            args.append("--all")
        args += ["--out", str(out_dir)]
        if transfer_syntax:
            args += ["--transfer-syntax", transfer_syntax]
        return self.cli(*args)

    def store(self, files: Iterable[Path | str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """storescu the files to this node."""
        kwargs.setdefault("aec", self.ae_title)
        return storescu(self.port, files, host=self.host, **kwargs)

    def echo(self, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
        return echoscu(self.port, aec=self.ae_title, aet=aet, host=self.host)


# --------------------------------------------------------------------------- PostgreSQL

POSTGRES_PACKAGE = "postgresql"
POSTGRES_ROOT = Path("/usr/lib/postgresql")
_postgres_install_error: str | None = None


def postgres_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server's programs (/usr/lib/postgresql/N/bin), if any."""
    found: list[tuple[int, Path]] = []
    for bin_dir in POSTGRES_ROOT.glob("*/bin"):
        if (bin_dir / "initdb").exists() and (bin_dir / "postgres").exists():
            with contextlib.suppress(ValueError):
                found.append((int(bin_dir.parent.name.split(".")[0]), bin_dir))
    return max(found)[1] if found else None


def ensure_postgres_server() -> Path:
    """Debian's PostgreSQL server programs, installed with apt-get when missing (as the DICOM
    peers are); a failed install is remembered for the session."""
    global _postgres_install_error
    found = postgres_bin_dir()
    if found is not None:
        return found
    if _postgres_install_error is not None:
        raise PeerError(_postgres_install_error)
    with _file_lock(STATE_DIR / "apt.lock"):
        if postgres_bin_dir() is None:
            try:
                _apt_install((POSTGRES_PACKAGE,))
            except (OSError, subprocess.SubprocessError) as exc:
                _postgres_install_error = f"apt-get install {POSTGRES_PACKAGE} failed: {exc}"
                raise PeerError(_postgres_install_error) from exc
    found = postgres_bin_dir()
    if found is None:
        _postgres_install_error = (
            f"no initdb/postgres under {POSTGRES_ROOT}/*/bin after apt-get install "
            f"{POSTGRES_PACKAGE}"
        )
        raise PeerError(_postgres_install_error)
    return found


def _server_user() -> pwd.struct_passwd | None:
    """Whom to run initdb and postgres as: None (ourselves) unless we are root, which both
    refuse; then the "postgres" user that Debian's package creates."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PeerError(
            "initdb refuses to run as root and this machine has no 'postgres' user: install "
            f"Debian's {POSTGRES_PACKAGE} package (it creates one) or run the tests as "
            "another user"
        ) from None


class PostgresCluster(ManagedProcess):
    """A throw-away PostgreSQL cluster: initdb in a fresh temp folder, then the postmaster
    in the foreground on a free loopback port (superuser ``postgres``, trust authentication,
    no Unix socket), removed by stop().

    The postmaster runs as our child rather than daemonised by pg_ctl, so that it is
    tracked, reaped after a crashed session and killed by PID like every other peer.
    Durability settings are off: the cluster dies with the session.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: does not wait for clients to leave

    def __init__(self, *, port: int | None = None, start_timeout: float = 120.0) -> None:
        self.bin_dir = ensure_postgres_server()
        self.user = _server_user()
        # Under the system temp dir, not pytest's (root's 0700 folders would keep the
        # postgres user out).
        self.workdir = Path(tempfile.mkdtemp(prefix="compacs-pg-"))
        if self.user is not None:
            os.chown(self.workdir, self.user.pw_uid, self.user.pw_gid)
        super().__init__(self.workdir / "postgres.log", start_timeout)
        self.port = port or free_port()
        self.data_dir = self.workdir / "data"

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL of the maintenance database, as the superuser."""
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"

    def popen_options(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self.user is not None:
            env.update(HOME=self.user.pw_dir, USER=self.user.pw_name, LOGNAME=self.user.pw_name)
        return env

    def initdb(self) -> None:
        """Create the cluster (once); its output goes to the log."""
        if self.data_dir.exists():
            return
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            res = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
                timeout=self.start_timeout,
                **self.popen_options(),
            )
        if res.returncode != 0:
            raise PeerError(f"initdb exited {res.returncode}:\n{self.log_tail()}")

    def command(self) -> list[str]:
        return [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
        ]  # fmt: skip

    def start(self) -> PostgresCluster:
        self.initdb()
        super().start()
        return self

    def wait_ready(self) -> None:
        """Ready when pg_isready says the server accepts connections (the port opens while
        it is still starting up and refusing them)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        probe = [str(self.bin_dir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port)]
        while True:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"postgres exited with {self.proc.returncode} during start-up:\n"
                    f"{self.log_tail()}"
                )
            res = subprocess.run(
                probe + ["-t", "2"], stdin=subprocess.DEVNULL, env=self.environment()
            )
            if res.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"postgres not ready after {self.start_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Shut down, then remove the cluster's folder (data and log)."""
        returncode = super().stop(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return returncode


# --------------------------------------------------------------------------- DCMTK tools


def run_dcmtk(
    tool: str, *args: str, timeout: float = 600.0, cwd: Path | str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1; stdout and stderr merged into ``.stdout``
    (DCMTK logs to stderr, findscu prints answers to stdout: one stream keeps the order)."""
    return subprocess.run(
        [tool, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dcmtk_env(),
        timeout=timeout,
        cwd=cwd,
    )


def transfer_syntax_of(path: Path | str) -> str:
    """A Part-10 file's transfer syntax UID, read from its meta header only (fast)."""
    from pydicom.filereader import read_file_meta_info

    return str(read_file_meta_info(path).TransferSyntaxUID)


def storescu_ts_flag(files: Iterable[Path | str]) -> str | None:
    """The one ``-x`` flag that lets storescu send these files as they are.

    None when all are uncompressed. Raises ValueError when they need different flags
    (storescu proposes one compressed syntax per run: send them in groups).
    """
    flags = {STORESCU_TS_FLAGS.get(transfer_syntax_of(f)) for f in files}
    flags.discard(None)
    if len(flags) > 1:
        raise ValueError(f"files need different storescu proposals {sorted(flags)}: split them")
    return flags.pop() if flags else None


def storescu(
    port: int,
    files: Iterable[Path | str],
    *,
    aec: str = "COMPACS",
    aet: str = "STORESCU",
    host: str = LOOPBACK,
    extra: Sequence[str] = (),
    ts_flag: str | None = "auto",
    halt: bool = False,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files with DCMTK storescu in one association, verbose log in ``.stdout``.

    Flags: ``-v`` for per-file results (see :func:`parse_storescu_log`), ``-nh`` (unless
    ``halt``) so one refused file does not hide the fate of the others, ``-R`` to propose
    only the SOP classes of the files, and ``ts_flag`` ("auto": picked from the files'
    transfer syntaxes, None: storescu's default uncompressed proposals). Caution: with
    ``-nh`` storescu exits 0 even when stores failed.
    """
    paths = [str(f) for f in files]
    if not paths:
        raise ValueError("storescu needs at least one file")
    args = ["-v", "-R", "-aet", aet, "-aec", aec]
    if not halt:
        args.append("-nh")
    if ts_flag == "auto":
        ts_flag = storescu_ts_flag(paths)
    if ts_flag:
        args.append(ts_flag)
    args += [*extra, host, str(port), *paths]
    return run_dcmtk("storescu", *args, timeout=timeout)


def parse_storescu_log(output: str) -> dict[str, str]:
    """Per-file outcome from ``storescu -v`` output: {path: "Success" | "Warning: ..." |
    "Failed: <reason>" | other response text}. Files storescu skipped are absent."""
    results: dict[str, str] = {}
    current: str | None = None
    failed: str | None = None
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: ") :]
            failed = None
        elif line.startswith("I: Received Store Response") and current is not None:
            text = line.split("(", 1)[1].rsplit(")", 1)[0] if "(" in line else line
            results[current] = text
        elif line.startswith("E: Store Failed, file: "):
            failed = line[len("E: Store Failed, file: ") :].rstrip(":")
            results[failed] = "Failed"
        elif line.startswith("E: ") and failed is not None and results[failed] == "Failed":
            results[failed] = f"Failed: {line[3:]}"
    return results


def store_ok(res: subprocess.CompletedProcess[str], files: Iterable[Path | str]) -> bool:
    """True when storescu reported Success for every one of the files."""
    results = parse_storescu_log(res.stdout)
    return all(results.get(str(f)) == "Success" for f in files)


def echoscu(
    port: int, aec: str = "COMPACS", aet: str = "ECHOSCU", host: str = LOOPBACK, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """C-ECHO; returncode 0 means the peer answered Success."""
    return run_dcmtk("echoscu", "-v", "-aet", aet, "-aec", aec, host, str(port), timeout=timeout)


def _keys(keys: Mapping[str, str] | Sequence[str]) -> list[str]:
    """``{"StudyInstanceUID": ""}`` or ``["StudyInstanceUID="]`` -> ``-k`` arguments."""
    items = (
        [f"{k}={v}" if v is not None else k for k, v in keys.items()]
        if isinstance(keys, Mapping)
        else list(keys)
    )
    out: list[str] = []
    for item in items:
        out += ["-k", item.rstrip("=") if item.endswith("=") else item]
    return out


def findscu(
    port: int,
    level: str,
    keys: Mapping[str, str] | Sequence[str],
    *,
    aec: str = "COMPACS",
    aet: str = "FINDSCU",
    host: str = LOOPBACK,
    out_dir: Path | str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Study-root C-FIND; with ``out_dir`` each answer is also written as rspNNNN.dcm there.
    An empty value asks for the attribute to be returned (``{"PatientName": ""}``)."""
    args = ["-v", "-S", "-aet", aet, "-aec", aec, "-k", f"QueryRetrieveLevel={level}"]
    args += _keys(keys)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        args += ["-X", "-od", str(out_dir)]
    args += [*extra, host, str(port)]
    return run_dcmtk("findscu", *args, timeout=timeout)


def getscu(
    port: int,
    level: str,
    keys: Mapping[str, str] | Sequence[str],
    out_dir: Path | str,
    *,
    aec: str = "COMPACS",
    aet: str = "GETSCU",
    host: str = LOOPBACK,
    extra: Sequence[str] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Study-root C-GET into ``out_dir``. What getscu accepts for the sub-operations is
    chosen with ``extra``: ``+xt`` JPEG-LS, ``+xv`` J2K, ``+xs`` JPEG lossless, ... (each
    with the uncompressed syntaxes); default: uncompressed only."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    args = ["-v", "-S", "-aet", aet, "-aec", aec, "-k", f"QueryRetrieveLevel={level}"]
    args += _keys(keys)
    args += ["-od", str(out_dir), *extra, host, str(port)]
    return run_dcmtk("getscu", *args, timeout=timeout)


def movescu(
    port: int,
    level: str,
    keys: Mapping[str, str] | Sequence[str],
    dest_aet: str,
    *,
    aec: str = "COMPACS",
    aet: str = "MOVESCU",
    host: str = LOOPBACK,
    extra: Sequence[str] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Study-root C-MOVE to ``dest_aet`` (a storescp or Orthanc known to the node)."""
    args = ["-v", "-S", "-aet", aet, "-aec", aec, "-aem", dest_aet]
    args += ["-k", f"QueryRetrieveLevel={level}", *_keys(keys), *extra, host, str(port)]
    return run_dcmtk("movescu", *args, timeout=timeout)


class StorescpProcess(ManagedProcess):
    """DCMTK storescp: the C-MOVE destination / push target that accepts every syntax."""

    name = "storescp"

    def __init__(
        self,
        out_dir: Path | str,
        *,
        port: int | None = None,
        aet: str = "STORESCP",
        extra: Sequence[str] = ("+xa",),
        log_path: Path | str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        super().__init__(
            Path(log_path)
            if log_path
            else self.out_dir.parent / f"storescp-{self.out_dir.name}.log",
            start_timeout,
        )
        self.port = port or free_port()
        self.aet = aet
        self.extra = list(extra)

    def command(self) -> list[str]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return [
            "storescp",
            "-v",
            "-aet",
            self.aet,
            "-od",
            str(self.out_dir),
            *self.extra,
            str(self.port),
        ]

    def received(self) -> list[Path]:
        """Files written so far (storescp names them <modality>.<SOP Instance UID>)."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


# --------------------------------------------------------------------------- Orthanc

_STACKFIX_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <dlfcn.h>
int pthread_attr_setstacksize(pthread_attr_t *attr, size_t size) {
    static int (*real)(pthread_attr_t *, size_t);
    if (!real)
        real = (int (*)(pthread_attr_t *, size_t)) dlsym(RTLD_NEXT, "pthread_attr_setstacksize");
    if (size < ((size_t) 8 << 20)) size = (size_t) 8 << 20;
    return real(attr, size);
}
"""


def stackfix_shim() -> Path | None:
    """Compile (once per machine) the LD_PRELOAD shim that gives Orthanc's web-server
    threads 8 MiB stacks; without it JPEG 2000 transcoding over REST segfaults.
    None when no C compiler exists."""
    so = STATE_DIR / "stackfix.so"
    if so.exists():
        return so
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    with _file_lock(STATE_DIR / "stackfix.lock"):
        if so.exists():
            return so
        src = STATE_DIR / "stackfix.c"
        src.write_text(_STACKFIX_C)
        tmp = STATE_DIR / f"stackfix.{os.getpid()}.so"
        res = subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            return None
        tmp.replace(so)
    return so


class OrthancHTTPError(PeerError):
    """A REST call answered with an HTTP error; ``status`` and ``body`` say which."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


# Bypass any http_proxy in the environment: the REST API is on loopback.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancProcess(ManagedProcess):
    """A throw-away Orthanc 1.10 (Debian package) as a plain process, configured as
    docs/design.md ("Real peers") says, with small REST helpers (urllib, no extra dependency)."""

    name = "orthanc"
    # Orthanc takes ~3.5 s to stop on SIGTERM (internal polling); its data is thrown away.
    graceful_teardown = False

    def __init__(
        self,
        workdir: Path | str,
        dicom_port: int | None = None,
        http_port: int | None = None,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, int] | tuple[str, str, int]] | None = None,
        ingest_transcoding: str | None = None,
        gdcm: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "logs" / "stdout.log", start_timeout)
        self.port = self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.ingest_transcoding = ingest_transcoding
        self.gdcm = gdcm
        self.extra_config = dict(extra_config or {})
        self.config_path = self.workdir / "config" / "orthanc.json"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The JSON configuration (extra_config laid over it)."""
        storage = str(self.workdir / "storage")
        mods = {}
        for name, entry in self.modalities.items():
            aet, host, port = (name, *entry) if len(entry) == 2 else entry
            mods[name] = {"AET": aet, "Host": host, "Port": int(port)}
        cfg: dict[str, Any] = {
            "Name": f"{self.aet}_TEST",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [str(GDCM_PLUGIN)] if self.gdcm and GDCM_PLUGIN.exists() else [],
            "Gdcm": {
                "Enable": True,
                "Throttling": 2,
                "RestrictTransferSyntaxes": [
                    "1.2.840.10008.1.2.4.90",
                    "1.2.840.10008.1.2.4.91",
                    "1.2.840.10008.1.2.4.92",
                    "1.2.840.10008.1.2.4.93",
                    "1.2.840.10008.1.2.5",
                ],
            },
            "BuiltinDecoderTranscoderOrder": "Before",
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": False,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            "DicomModalities": mods,
            "StorageCompression": False,
            "SaveJobs": False,
            "SynchronousCMove": True,
            "OverwriteInstances": False,
            "StableAge": 60,
        }
        if self.ingest_transcoding:
            cfg["IngestTranscoding"] = self.ingest_transcoding
        cfg.update(self.extra_config)
        return cfg

    def command(self) -> list[str]:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        return [str(ORTHANC_BIN), f"--logdir={self.workdir / 'logs'}", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        env = dcmtk_env()
        shim = stackfix_shim()
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        return env

    def wait_ready(self) -> None:
        """Ready when HTTP /system answers and the DICOM port listens."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"Orthanc exited with {self.proc.returncode} during start-up:\n"
                    f"{self.log_tail()}\n{self.orthanc_log_tail()}"
                )
            try:
                self.get_json("/system")
                if port_open(LOOPBACK, self.dicom_port):
                    return
            except (OSError, PeerError):
                pass
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"Orthanc not ready after {self.start_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def orthanc_log_tail(self, lines: int = 40) -> str:
        """Tail of Orthanc's own log files (written under logs/ by --logdir)."""
        logs = sorted((self.workdir / "logs").glob("Orthanc*"), key=lambda p: p.stat().st_mtime)
        return tail(logs[-1], lines) if logs else ""

    # ---- REST
    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None,
        content_type: str | None = None,
        timeout: float = 120.0,
    ) -> bytes:
        """One HTTP call to the REST API; raises OrthancHTTPError on an HTTP error."""
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        url = self.url + path
        req = urllib.request.Request(url, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with _http.open(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancHTTPError(
                method, url, exc.code, exc.read().decode(errors="replace")
            ) from exc

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path)

    def post_json(self, path: str, body: Any = None) -> Any:
        out = self.request("POST", path, body if body is not None else {})
        return json.loads(out) if out.strip() else None

    def put_json(self, path: str, body: Any) -> Any:
        out = self.request("PUT", path, body)
        return json.loads(out) if out.strip() else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def upload(self, src: Path | str | bytes) -> dict[str, Any]:
        """POST /instances; returns Orthanc's answer ({"ID", "Status", ...})."""
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        return json.loads(self.request("POST", "/instances", data, "application/dicom"))

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return self.get_json("/instances")

    def statistics(self) -> dict[str, Any]:
        return self.get_json("/statistics")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOP Instance UID, None if absent."""
        hits = self.post_json("/tools/lookup", sop_instance_uid)
        ids = [h["ID"] for h in hits if h.get("Type") == "Instance"]
        return ids[0] if ids else None

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return self.get_json(f"/instances/{instance_id}/simplified-tags")

    def instance_transfer_syntax(self, instance_id: str) -> str:
        return self.request("GET", f"/instances/{instance_id}/metadata/TransferSyntax").decode()

    def instance_file(self, instance_id: str) -> bytes:
        """The stored Part-10 file, byte for byte."""
        return self.get_bytes(f"/instances/{instance_id}/file")

    def instance_dataset(self, instance_id: str) -> Any:
        """The stored file parsed by pydicom (for pixel comparisons)."""
        import pydicom

        return pydicom.dcmread(io.BytesIO(self.instance_file(instance_id)))

    def frame_raw(self, instance_id: str, frame: int = 0) -> bytes:
        """One frame as stored: raw pixels if uncompressed, the codestream if compressed."""
        return self.get_bytes(f"/instances/{instance_id}/frames/{frame}/raw")

    def put_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer at run time (needed for C-MOVE targets and callers)."""
        self.put_json(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port)})

    def echo_modality(self, name: str) -> None:
        self.post_json(f"/modalities/{name}/echo", {})

    def store_to_modality(self, name: str, resources: Sequence[str]) -> Any:
        """C-STORE Orthanc resources (IDs) to a declared modality, synchronously."""
        return self.post_json(
            f"/modalities/{name}/store", {"Resources": list(resources), "Synchronous": True}
        )

    def query_modality(self, name: str, level: str, query: Mapping[str, str]) -> list[dict]:
        """C-FIND at a declared modality; returns the answers' simplified tags."""
        q = self.post_json(f"/modalities/{name}/query", {"Level": level, "Query": dict(query)})
        return self.get_json(f"/queries/{q['ID']}/answers?expand&simplify")

    def move_from_modality(
        self,
        name: str,
        level: str,
        resources: Sequence[Mapping[str, str]],
        target_aet: str | None = None,
    ) -> Any:
        """C-MOVE from a declared modality (default target: this Orthanc)."""
        body = {
            "Level": level,
            "Resources": [dict(r) for r in resources],
            "TargetAet": target_aet or self.aet,
            "Synchronous": True,
        }
        return self.post_json(f"/modalities/{name}/move", body)
