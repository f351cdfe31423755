"""The compose stack run for real: compacs, Orthanc and PostgreSQL in containers (podman).

`docker-compose.yml` as users run it, with `deploy/compose.local.yml` swapping in images
built here from Debian packages (`deploy/build-local-images.sh`; reused by tag between
runs). The test installs podman and friends with apt-get when missing, brings the stack up
under a project name of its own on free host ports, and tears down only that project:
its containers, volumes and network (never an image, never anything else).

podman-compose 1.0.3 (Debian bookworm) knows no profiles, so the services are named on the
command line; the `monitoring` profile's Prometheus and Grafana are not started here.
The compacs container's /metrics (COMPACS_METRICS_PORT in docker-compose.yml, published on a
free host port) is scraped after an ingest: `test_metrics_endpoint_answers` prints an excerpt.

Timings (image build, start until healthy, the whole module) are printed at the end:
`pytest tests/test_containers.py -s`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import dicomdata
import numpy as np
import peers
import pydicom
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ["-f", "docker-compose.yml", "-f", "deploy/compose.local.yml"]
SERVICES = ["postgres", "compacs", "orthanc"]
# What the stack needs on the host: a probe (a command on PATH or a file) per package.
PACKAGES = {
    "podman": "podman",
    "podman-compose": "podman-compose",
    "runc": "runc",
    "netavark": "/usr/lib/podman/netavark",
    "aardvark-dns": "/usr/lib/podman/aardvark-dns",
    "iptables": "iptables",  # netavark's port forwarding and bridge rules
    "mmdebstrap": "mmdebstrap",
}
PSQL = "/usr/lib/postgresql/15/bin/psql"
TIMINGS: dict[str, float] = {}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the stack runs in rootful podman (as in CI)"
)


def _missing_packages() -> list[str]:
    return [
        pkg
        for pkg, probe in PACKAGES.items()
        if not (Path(probe).exists() if probe.startswith("/") else shutil.which(probe))
    ]


def ensure_podman() -> None:
    """apt-get install what is missing, under the lock the other peer installs take."""
    if not _missing_packages():
        return
    with peers._file_lock(peers.STATE_DIR / "apt.lock"):
        missing = _missing_packages()
        if missing:
            peers._apt_install(missing)
    still = _missing_packages()
    assert not still, f"still missing after apt-get install: {', '.join(still)}"


def podman_env() -> dict[str, str]:
    """The project's own podman settings (deploy/containers.conf), nothing from /etc."""
    return dict(os.environ, CONTAINERS_CONF=str(ROOT / "deploy" / "containers.conf"))


def run(
    *cmd: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        list(cmd), cwd=ROOT, env=env or podman_env(), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        )
    return res


class Stack:
    """One compose project of this test: its name, its host ports, its containers."""

    def __init__(self) -> None:
        self.project = f"compacstest{uuid.uuid4().hex[:8]}"
        self.dicom_port = peers.free_port()
        self.orthanc_http = peers.free_port()
        self.metrics_port = peers.free_port()
        self.env = podman_env()
        self.env.update(
            COMPACS_PUBLISH_DICOM=f"127.0.0.1:{self.dicom_port}",
            COMPACS_PUBLISH_METRICS=f"127.0.0.1:{self.metrics_port}",
            ORTHANC_PUBLISH_DICOM=f"127.0.0.1:{peers.free_port()}",
            ORTHANC_PUBLISH_HTTP=f"127.0.0.1:{self.orthanc_http}",
        )
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run("podman-compose", "-p", self.project, *COMPOSE, *args, timeout=timeout,
                   env=self.env)  # fmt: skip

    def up(self) -> None:
        self.compose("up", "-d", *SERVICES)

    def container(self, service: str) -> str:
        res = run(
            "podman", "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        )  # fmt: skip
        names = res.stdout.split()
        assert len(names) == 1, f"{service}: containers {names}"
        return names[0]

    def exec(self, service: str, *cmd: str, timeout: float = 300) -> str:
        return run("podman", "exec", self.container(service), *cmd, timeout=timeout).stdout

    def logs(self, service: str) -> str:
        res = run("podman", "logs", "--tail", "40", self.container(service), check=False)
        return res.stdout + res.stderr

    def wait_healthy(self, timeout: float = 300) -> str:
        """Run the image's HEALTHCHECK (`compacs health`) until it passes: without systemd
        podman has no timer to run it, so the test runs it as the timer would."""
        name = self.container("compacs")
        deadline = time.monotonic() + timeout
        while True:
            res = run("podman", "healthcheck", "run", name, check=False, timeout=120)
            if res.returncode == 0:
                state = json.loads(run("podman", "inspect", name).stdout)[0]["State"]
                return (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"compacs not healthy after {timeout} s: {res.stdout}{res.stderr}\n"
                    f"{self.logs('compacs')}"
                )
            time.sleep(2)

    def orthanc(self, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
        if body is None or isinstance(body, str):  # /tools/lookup takes the bare UID
            data = None if body is None else body.encode()
        else:
            data = json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.orthanc_http}{path}", data=data, method=method
        )
        with self._http.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return raw if path.endswith("/file") else json.loads(raw or b"null")

    def wait_orthanc(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.orthanc("GET", "/system", timeout=5)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Orthanc: {exc}\n{self.logs('orthanc')}") from exc
                time.sleep(1)

    def psql(self, sql: str) -> list[str]:
        """A query in the PostgreSQL container, over its local socket."""
        out = self.exec(
            "postgres", PSQL, "-h", "/var/run/postgresql", "-U", "compacs", "-d", "compacs",
            "-tAc", sql,
        )  # fmt: skip
        return out.split()

    def teardown(self) -> None:
        """`down -v`, and what podman-compose 1.0.3 leaves of the project: its network."""
        self.compose("down", "-v", timeout=300)
        label = f"label=io.podman.compose.project={self.project}"
        for vol in run("podman", "volume", "ls", "-q", "--filter", label).stdout.split():
            run("podman", "volume", "rm", "-f", vol, check=False)
        run("podman", "network", "rm", "-f", f"{self.project}_default", check=False)


@pytest.fixture(scope="module")
def stack(debian_peers: None) -> Iterator[Stack]:
    started = time.monotonic()
    ensure_podman()
    t0 = time.monotonic()
    with peers._file_lock(peers.STATE_DIR / "images.lock"):  # one build at a time
        build = run("deploy/build-local-images.sh", timeout=3600)
    TIMINGS["images (build or reuse)"] = time.monotonic() - t0
    print(build.stderr.strip().splitlines()[-1])
    s = Stack()
    try:
        t0 = time.monotonic()
        s.up()
        s.wait_healthy()
        s.wait_orthanc()
        TIMINGS["stack up until healthy"] = time.monotonic() - t0
        yield s
    finally:
        s.teardown()
        TIMINGS["module"] = time.monotonic() - started
        sizes = run("podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout
        print(
            "\ncontainer test timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items())
        )
        print("images:\n" + "\n".join(line for line in sizes.splitlines() if "compacs" in line))


def acknowledged(files: list[Path], output: str) -> list[Path]:
    results = peers.parse_storescu_log(output)
    return [f for f in files if results.get(str(f)) == "Success"]


def move_and_compare(stack: Stack, study_uid: str, expected: dict[str, np.ndarray]) -> None:
    """Orthanc C-MOVEs the study from compacs to itself; every expected instance arrives
    with pixels equal to the input's."""
    stack.orthanc(
        "POST", "/modalities/compacs/move",
        {"Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
         "TargetAet": "ORTHANC", "Timeout": 300},
    )  # fmt: skip
    found = stack.orthanc("POST", "/tools/lookup", study_uid)
    studies = [r["ID"] for r in found if r["Type"] == "Study"]
    assert len(studies) == 1, f"Orthanc has no study {study_uid} after the C-MOVE: {found}"
    got: dict[str, np.ndarray] = {}
    for inst in stack.orthanc("GET", f"/studies/{studies[0]}/instances"):
        raw = stack.orthanc("GET", f"/instances/{inst['ID']}/file")
        ds = pydicom.dcmread(BytesIO(raw))
        got[str(ds.SOPInstanceUID)] = ds.pixel_array
    assert set(expected) <= set(got), f"missing after C-MOVE: {set(expected) - set(got)}"
    for uid, pixels in expected.items():
        assert got[uid].dtype == pixels.dtype and np.array_equal(got[uid], pixels), uid


def by_uid(files: list[Path]) -> dict[str, np.ndarray]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
            dicomdata.read_pixels(f) for f in files}  # fmt: skip


def test_compacs_turns_healthy(stack: Stack) -> None:
    assert stack.wait_healthy() == "healthy"
    line = stack.exec("compacs", "compacs", "health", "--config", "/etc/compacs/compacs.toml")
    assert line.startswith("healthy: C-ECHO COMPACS@127.0.0.1:11112 ok; index ok; ")
    assert "/var/lib/compacs/archive writable" in line


def test_db_upgrade_in_the_container_reads_the_same_index(stack: Stack) -> None:
    """What README's upgrade step runs (`compacs db upgrade` in the compacs container, no
    flags): it finds the PostgreSQL index through COMPACS_INDEX_URL, already current."""
    out = stack.exec("compacs", "compacs", "db", "upgrade")
    assert out.startswith("index postgresql+psycopg://compacs:***@postgres/compacs is at ")
    assert "nothing to do" in out


def test_orthanc_runs_on_the_mounted_config(stack: Stack) -> None:
    """deploy/orthanc.json is what Orthanc runs with, and the Debian image loads GDCM."""
    system = stack.orthanc("GET", "/system")
    assert system["Name"] == "orthanc (compacs compose)" and system["DicomAet"] == "ORTHANC"
    assert "gdcm" in stack.orthanc("GET", "/plugins")
    assert stack.orthanc("GET", "/modalities") == ["compacs"]


def test_store_find_move_bit_exact_on_the_postgres_index(stack: Stack, tmp_path: Path) -> None:
    files = dicomdata.real_ct_series(tmp_path / "ct")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    res = peers.storescu(stack.dicom_port, files, host="127.0.0.1")
    assert acknowledged(files, res.stdout) == files, res.stdout[-3000:]

    # The Orthanc container finds the study at compacs (C-FIND from ORTHANC, in [access])...
    query = stack.orthanc(
        "POST", "/modalities/compacs/query",
        {"Level": "Study", "Query": {"StudyInstanceUID": study_uid, "ModalitiesInStudy": ""}},
    )  # fmt: skip
    answers = stack.orthanc("GET", f"/queries/{query['ID']}/answers?expand&simplify")
    assert [a["StudyInstanceUID"] for a in answers] == [study_uid]
    # ...and moves it to itself: the pixels are the input's.
    move_and_compare(stack, study_uid, by_uid(files))

    # The index is the PostgreSQL container's, not a SQLite file in the compacs volume.
    in_pg = set(stack.psql("SELECT sop_instance_uid FROM instance"))
    assert set(by_uid(files)) <= in_pg
    listing = stack.exec("compacs", "ls", "-A", "/var/lib/compacs").split()
    assert "archive" in listing and "index.sqlite" not in listing


def test_metrics_endpoint_answers(stack: Stack, tmp_path: Path) -> None:
    """The compacs container's /metrics, through its published port, after an ingest of its
    own (the counters start again with the container, which the kill test restarts)."""
    files = dicomdata.real_ct_series(tmp_path / "ct")[:4]
    res = peers.storescu(stack.dicom_port, files, host="127.0.0.1")
    assert acknowledged(files, res.stdout) == files, res.stdout[-3000:]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    values = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("compacs_") and " " in line
    }
    assert values["compacs_instances_received_total"] >= len(files), text
    assert values['compacs_associations_total{result="accepted"}'] >= 1
    assert "# TYPE compacs_cstore_seconds histogram" in text
    excerpt = [
        line for line in text.splitlines() if line.startswith("compacs_") and "_bucket" not in line
    ]
    print("\n/metrics after the ingest (excerpt):\n" + "\n".join(excerpt))


def test_kill_mid_ingest_loses_nothing_acknowledged(stack: Stack, tmp_path: Path) -> None:
    """`podman kill` of compacs while storescu sends three series in one association, then
    `up` again: every instance compacs acknowledged is in the index and comes back
    bit-exact; nothing is left pending and `compacs verify` finds no problem."""
    files = [f for i in range(3) for f in dicomdata.real_ct_series(tmp_path / f"s{i}")]
    # -td: a response that never comes (the peer gone without a reset) ends storescu too.
    cmd = ["storescu", "-v", "-R", "-nh", "-xv", "-td", "120", "-aet", "STORESCU",
           "-aec", "COMPACS", "127.0.0.1", str(stack.dicom_port), *map(str, files)]  # fmt: skip
    sender = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peers.dcmtk_env()
    )
    assert sender.stdout is not None
    lines: list[str] = []
    killed = threading.Event()
    for line in sender.stdout:
        lines.append(line)
        if not killed.is_set() and sum("Store Response (Success)" in x for x in lines) >= 8:
            run("podman", "kill", stack.container("compacs"))
            killed.set()
    sender.wait(timeout=300)
    acked = acknowledged(files, "".join(lines))
    assert killed.is_set(), "".join(lines[-40:])
    assert 8 <= len(acked) < len(files), f"{len(acked)} acknowledged: not killed mid-ingest"
    print(f"\nkilled mid-ingest: {len(acked)} of {len(files)} acknowledged")

    stack.up()
    stack.wait_healthy()
    in_pg = set(stack.psql("SELECT sop_instance_uid FROM instance"))
    expected = by_uid(acked)
    assert set(expected) <= in_pg, f"acknowledged, then lost: {set(expected) - in_pg}"

    deadline = time.monotonic() + 600
    while (stats := json.loads(stack.exec("compacs", "compacs", "stats", "--json")))["pending"]:
        assert time.monotonic() < deadline, f"still pending after 600 s: {stats}"
        time.sleep(3)
    verify = run("podman", "exec", stack.container("compacs"), "compacs", "verify", check=False)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]

    studies: dict[str, dict[str, np.ndarray]] = {}
    for f in acked:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        studies.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPInstanceUID)] = expected[
            str(ds.SOPInstanceUID)
        ]
    for study_uid, instances in studies.items():
        move_and_compare(stack, study_uid, instances)
