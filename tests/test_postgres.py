"""The same node on a PostgreSQL index: keeps the index code free of SQLite-only SQL.

Each test gets a database of its own (conftest's pg_url), dropped afterwards, on the
machine's PostgreSQL (127.0.0.1:5432, trust auth) or, where none answers, on a throw-away
cluster the session starts; skipped only when COMPACS_TESTS_SKIP_NO_POSTGRES=1 says so.
The last tests check that fixture itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
from nodecheck import exported_by_sop, store_all, wait_compressed
from sqlalchemy import create_engine


def test_store_export_verify_on_postgresql(make_node, pg_url: str, samples, tmp_path: Path) -> None:
    node = make_node(env={"COMPACS_INDEX_URL": pg_url})
    assert "postgresql+psycopg://postgres" in node.log_text()
    files = [samples[k] for k in ("ct", "multiframe", "signed12", "rgb", "jpeg_ls")]
    files = [dicomdata.fresh_copy(f, tmp_path / "in") for f in files]
    store_all(node, files)
    env = {"COMPACS_INDEX_URL": pg_url}
    stats = wait_compressed(node, len(files), env=env)
    assert stats["instances"] == len(files)
    assert stats["by_codec"]["jpegls"]["instances"] >= 3
    out = tmp_path / "out"
    res = node.cli("export", "--data", str(node.data_dir), "--all", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    exported = exported_by_sop(out)
    for f in files:
        src = pydicom.dcmread(f)
        got = pydicom.dcmread(exported[src.SOPInstanceUID])
        assert np.array_equal(got.pixel_array, src.pixel_array)
    res = node.cli("verify", "--data", str(node.data_dir), env=env)
    assert res.returncode == 0, res.stdout
    # the SQLite default was not used behind our back
    assert not (node.data_dir / "index.sqlite").exists()


def test_pg_url_is_a_database_of_its_own(pg_url: str) -> None:
    """Writes and reads back; prints which server answered (the next test reads it)."""
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE probe (n integer)")
            conn.exec_driver_sql("INSERT INTO probe VALUES (1), (2)")
            assert conn.exec_driver_sql("SELECT sum(n) FROM probe").scalar() == 3
            database = conn.exec_driver_sql("SELECT current_database()").scalar()
            port = conn.exec_driver_sql("SELECT inet_server_port()").scalar()
            data_dir = conn.exec_driver_sql("SHOW data_directory").scalar()
    finally:
        engine.dispose()
    assert pg_url.endswith(f"/{database}") and database.startswith("compacs_test_")
    print(f"\nPOSTGRES port={port} data_directory={data_dir}")


def test_without_a_server_the_session_starts_its_own_cluster() -> None:
    """The machine's server reported absent (COMPACS_TESTS_POSTGRES_URL at a closed port): a
    pytest run of the test above still gets a working database, on a cluster in a temp
    folder that is gone, and no longer listening, once that run has ended."""
    closed = peers.free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "COMPACS_TESTS_SKIP_NO_POSTGRES"}
    env["COMPACS_TESTS_POSTGRES_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{closed}/postgres"
    here = Path(__file__)
    res = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
            f"{here}::test_pg_url_is_a_database_of_its_own",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=here.parent.parent,
        timeout=600,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "1 passed" in out, out[-4000:]
    found = re.search(r"POSTGRES port=(\d+) data_directory=(\S+)", out)
    assert found, out[-4000:]
    port, data_dir = int(found[1]), Path(found[2])
    assert port not in (closed, 5432)
    assert data_dir.parent.name.startswith("compacs-pg-"), data_dir
    assert not data_dir.parent.exists()  # removed at the end of that session
    assert not peers.port_open(peers.LOOPBACK, port)
