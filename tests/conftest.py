"""Fixtures that start real peers: the compacs service, Orthanc and DCMTK's storescp.

Every process is started on free loopback ports and stopped by PID at teardown (SIGTERM,
then SIGKILL); anything still alive at the end of the session, or left by a crashed
earlier session, is killed by PID too. On a failed test the processes' log tails are
printed in the teardown section of the report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

# tests/ has no __init__.py: make its helper modules importable as ``peers``/``dicomdata``
# whatever the rootdir and import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicomdata  # noqa: E402
import peers  # noqa: E402

# The modules whose node tests run twice: with the fast paths that replace pynetdicom
# internals (dimse/internals.py) and with pynetdicom's own send paths (COMPACS_FAST_PATHS=0).
BOTH_PATHS = {"test_find", "test_retrieve", "test_syntax_choice"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    uses_node = {"make_node", "compacs_node"} & set(metafunc.fixturenames)
    if uses_node and metafunc.module.__name__ in BOTH_PATHS:
        metafunc.parametrize("fast_paths", ["fast", "plain"], indirect=True)


@pytest.fixture
def fast_paths(request: pytest.FixtureRequest) -> bool:
    """Whether nodes started by make_node use the fast paths (True unless parametrized)."""
    return getattr(request, "param", "fast") == "fast"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "peers: needs DCMTK and/or Orthanc (installed via apt)")
    config.addinivalue_line("markers", "slow: sends hundreds of images or runs long jobs")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item, so fixtures can tell a failed test."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(request: pytest.FixtureRequest) -> bool:
    reps = (getattr(request.node, f"rep_{when}", None) for when in ("setup", "call"))
    return any(rep is not None and rep.failed for rep in reps)


@pytest.fixture(scope="session", autouse=True)
def _process_reaper() -> Iterator[None]:
    """Kill (by recorded PID) peers left by an aborted run, and ours at session end."""
    peers.reap_stale_pids()
    yield
    peers.kill_leftovers()


@pytest.fixture(scope="session")
def debian_peers() -> None:
    """dcmtk, orthanc and orthanc-gdcm present (apt-get installs them when missing).

    An install failure fails the tests that need peers; set COMPACS_TESTS_SKIP_NO_PEERS=1
    to skip them instead (machines without network and without the packages).
    """
    try:
        peers.ensure_debian_packages()
    except peers.PeerError as exc:
        if os.environ.get("COMPACS_TESTS_SKIP_NO_PEERS") == "1":
            pytest.skip(f"DICOM peers unavailable: {exc}")
        pytest.fail(f"DICOM peers unavailable: {exc}", pytrace=False)


def _teardown(request: pytest.FixtureRequest, procs: Sequence[peers.ManagedProcess]) -> None:
    failed = _failed(request)
    for proc in procs:
        if failed:
            print(f"\n----- {proc.name} log tail ({proc.log_path}) -----\n{proc.log_tail(80)}")
        if proc.graceful_teardown:
            proc.stop()
        else:
            proc.kill9()


MakeNode = Callable[..., peers.CompacsProcess]


@pytest.fixture
def make_node(
    tmp_path: Path, request: pytest.FixtureRequest, debian_peers: None, fast_paths: bool
) -> Iterator[MakeNode]:
    """Factory: ``make_node(config=None, env=None, *, ae_title="COMPACS", extra_args=(),
    data_dir=None, port=None, start=True, log_path=None) -> CompacsProcess``.

    ``config`` is a path or TOML text (written to tmp_path). Data dirs are tmp_path/data,
    tmp_path/data1, ...; logs beside them (compacs-data.log). Restart a node with
    ``node.kill9(); node.start()`` on the same data dir and port.
    """
    nodes: list[peers.CompacsProcess] = []

    def factory(
        config: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        ae_title: str = "COMPACS",
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
        port: int | None = None,
        start: bool = True,
        log_path: Path | None = None,
    ) -> peers.CompacsProcess:
        index = len(nodes)
        if isinstance(config, str) and ("\n" in config or not Path(config).exists()):
            cfg_file = tmp_path / f"compacs{index or ''}.toml"
            cfg_file.write_text(config)
            config = cfg_file
        node = peers.CompacsProcess(
            data_dir or tmp_path / f"data{index or ''}",
            port=port,
            ae_title=ae_title,
            config=config,
            env={**({} if fast_paths else {"COMPACS_FAST_PATHS": "0"}), **(env or {})},
            extra_args=extra_args,
            log_path=log_path,
        )
        nodes.append(node)
        if start:
            node.start()
        return node

    yield factory
    _teardown(request, nodes)


@pytest.fixture
def compacs_node(make_node: MakeNode) -> peers.CompacsProcess:
    """A started compacs node with default configuration (AE COMPACS, tmp_path/data)."""
    return make_node()


MakeOrthanc = Callable[..., peers.OrthancProcess]


@pytest.fixture
def make_orthanc(
    tmp_path: Path, request: pytest.FixtureRequest, debian_peers: None
) -> Iterator[MakeOrthanc]:
    """Factory: ``make_orthanc(aet="ORTHANC", modalities=None, ingest_transcoding=None,
    gdcm=True, extra_config=None, start=True) -> OrthancProcess`` on free ports, in
    tmp_path/orthanc, tmp_path/orthanc1, ... ``modalities``: ``{AE: (host, port)}``."""
    procs: list[peers.OrthancProcess] = []

    def factory(
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, int] | tuple[str, str, int]] | None = None,
        ingest_transcoding: str | None = None,
        gdcm: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        start: bool = True,
    ) -> peers.OrthancProcess:
        proc = peers.OrthancProcess(
            tmp_path / f"orthanc{len(procs) or ''}",
            aet=aet,
            modalities=modalities,
            ingest_transcoding=ingest_transcoding,
            gdcm=gdcm,
            extra_config=extra_config,
        )
        procs.append(proc)
        if start:
            proc.start()
        return proc

    yield factory
    _teardown(request, procs)


@pytest.fixture
def orthanc(make_orthanc: MakeOrthanc) -> peers.OrthancProcess:
    """A started Orthanc with the default configuration (AE ORTHANC, GDCM plugin)."""
    return make_orthanc()


MakeStorescp = Callable[..., peers.StorescpProcess]


@pytest.fixture
def make_storescp(
    tmp_path: Path, request: pytest.FixtureRequest, debian_peers: None
) -> Iterator[MakeStorescp]:
    """Factory: ``make_storescp(aet="STORESCP", extra=("+xa",)) -> StorescpProcess``
    receiving into tmp_path/storescp, tmp_path/storescp1, ... (C-MOVE destination)."""
    procs: list[peers.StorescpProcess] = []

    def factory(aet: str = "STORESCP", extra: Sequence[str] = ("+xa",)) -> peers.StorescpProcess:
        proc = peers.StorescpProcess(tmp_path / f"storescp{len(procs) or ''}", aet=aet, extra=extra)
        procs.append(proc)
        proc.start()
        return proc

    yield factory
    _teardown(request, procs)


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fresh-UID copies of real sample files (see dicomdata.SAMPLE_SOURCES), shared by the
    session: copy again with dicomdata.fresh_copy when a test needs unseen UIDs."""
    return dicomdata.sample_files(tmp_path_factory.mktemp("samples"))


# The machine's PostgreSQL, used when it answers (trust auth); COMPACS_TESTS_POSTGRES_URL
# points the tests at another one, or at none (a closed port) to make them start their own.
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _postgres_problem(url: str) -> str | None:
    """Why the server at ``url`` cannot serve the tests (None: it can)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sqlalchemy.exc.OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """Admin URL of a PostgreSQL server the tests may create databases on.

    The machine's (COMPACS_TESTS_POSTGRES_URL, default 127.0.0.1:5432) when it answers;
    otherwise a throw-away cluster of the session (peers.PostgresCluster: Debian's
    postgresql, installed with apt-get when missing). Failing to get either fails the tests
    that need it; COMPACS_TESTS_SKIP_NO_POSTGRES=1 skips them instead.
    """
    url = os.environ.get("COMPACS_TESTS_POSTGRES_URL", PG_ADMIN_URL)
    problem = _postgres_problem(url)
    if problem is None:
        yield url
        return
    cluster: peers.PostgresCluster | None = None
    try:
        cluster = peers.PostgresCluster()
        cluster.start()
    except peers.PeerError as exc:
        message = f"no PostgreSQL at {url} ({problem}), and none could be started: {exc}"
        if cluster is not None:
            cluster.stop()
        if os.environ.get("COMPACS_TESTS_SKIP_NO_POSTGRES") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    try:
        yield cluster.admin_url
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A database of its own on the session's PostgreSQL server (pg_admin_url), dropped
    afterwards."""
    import uuid

    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    name = f"compacs_test_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        engine.dispose()
