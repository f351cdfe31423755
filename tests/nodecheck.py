"""Checks on a running node that several test modules share."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import peers
import pydicom


def node_stats(node: peers.CompacsProcess, env: dict[str, str] | None = None) -> dict:
    """`compacs stats --json` of the node's data folder (env: e.g. its COMPACS_INDEX_URL)."""
    res = node.cli("stats", "--data", str(node.data_dir), "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_compressed(
    node: peers.CompacsProcess, expected: int, timeout: float = 120, env: dict | None = None
) -> dict:
    """Poll `compacs stats` until `expected` instances exist and none is pending.

    A deadline only so a broken node fails the test instead of hanging it; nothing here
    asserts on how long it took.
    """
    deadline = time.monotonic() + timeout
    while True:
        current = node_stats(node, env)
        if current["instances"] >= expected and current["pending"] == 0:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"not all compressed: {current}\n{node.log_tail()}")
        time.sleep(0.3)


def store_all(node: peers.CompacsProcess, files: list[Path]) -> None:
    """storescu the files, one association per transfer syntax proposal they need."""
    groups: dict[str | None, list[Path]] = defaultdict(list)
    for f in files:
        groups[peers.storescu_ts_flag([f])].append(f)
    for group in groups.values():
        res = node.store(group)
        assert peers.store_ok(res, group), res.stdout[-3000:]


def exported_by_sop(out: Path) -> dict[str, Path]:
    return {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.rglob("*.dcm")
    }


def raw_pixels(path: Path) -> np.ndarray:
    """Pixels as stored values (no colour conversion), to compare without interpretation."""
    from pydicom.pixels import pixel_array

    return pixel_array(pydicom.dcmread(path), raw=True)  # dcmread: also inflates deflate


JOB_COLUMNS = ("state", "attempts", "last_error", "codec", "defects", "version", "claimed_by")


def job_rows(node: peers.CompacsProcess) -> dict[str, dict]:
    """Each instance's compression state as the node's SQLite index holds it, by SOP
    Instance UID: what a test compares when it asks whether a restart re-ran a job."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(f"SELECT sop_instance_uid, {', '.join(JOB_COLUMNS)} FROM instance")
            ).mappings()
            return {row["sop_instance_uid"]: dict(row) for row in rows}
    finally:
        engine.dispose()
