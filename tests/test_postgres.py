"""The same node on a PostgreSQL index: keeps the index code free of SQLite-only SQL.

Each test gets a database of its own on the machine's PostgreSQL (127.0.0.1:5432, trust
auth), dropped afterwards. Skipped, saying why, where no PostgreSQL answers.
"""

from __future__ import annotations

from pathlib import Path

import dicomdata
import numpy as np
import pydicom
from nodecheck import exported_by_sop, store_all, wait_compressed


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
