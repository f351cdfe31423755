"""Prometheus metrics and JSON logs of a real node process (issue 21, items 4 and 5).

A node with `[metrics] port` receives a real CT series by DCMTK storescu and gives it back
by getscu (C-GET); its /metrics is scraped over HTTP and parsed with prometheus_client's
own parser. The Grafana dashboard's queries are checked against what that node exports.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import dicomdata
import nodecheck
import peers
import psutil
import pydicom
import pytest
from conftest import MakeNode
from prometheus_client.parser import text_string_to_metric_families

from compacs.service import metrics
from compacs.service.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "compacs.json"
# The metrics issue 21 names, as families (a counter's family drops _total)
REQUIRED = {
    "compacs_associations": "counter",
    "compacs_instances_received": "counter",
    "compacs_instances_stored": "counter",
    "compacs_bytes_received": "counter",
    "compacs_bytes_stored": "counter",
    "compacs_codec_fallbacks": "counter",
    "compacs_cstore_seconds": "histogram",
    "compacs_retrieve_seconds": "histogram",
    "compacs_pending_instances": "gauge",
    "compacs_parked_instances": "gauge",
    "compacs_tier_backlog_instances": "gauge",
    "compacs_fixity_failures": "counter",
    "compacs_index_seconds": "histogram",
}


def scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a scrape."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def ingested(make_node: MakeNode, tmp_path: Path) -> tuple[peers.CompacsProcess, str, list[Path]]:
    """A node after a real ingest (storescu, 20 CT slices) and a C-GET of the study: the
    node, its /metrics text and the files sent."""
    port = peers.free_port()
    node = make_node(f"[metrics]\nport = {port}\n")
    files = dicomdata.real_ct_series(tmp_path / "ct")
    res = peers.storescu(node.port, files)
    assert peers.store_ok(res, files), res.stdout[-3000:]
    nodecheck.wait_compressed(node, len(files), timeout=300)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    got = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, tmp_path / "got")
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert len(list((tmp_path / "got").iterdir())) == len(files)
    node.metrics_port = port  # type: ignore[attr-defined]
    return node, scrape(port), files


def test_metrics_count_a_real_ingest_and_retrieve(
    ingested: tuple[peers.CompacsProcess, str, list[Path]],
) -> None:
    node, text, files = ingested
    for family, kind in REQUIRED.items():
        shown = f"{family}_total" if kind == "counter" else family
        assert re.search(rf"^# HELP {shown} \S", text, re.M), f"no HELP for {shown}"
        assert f"\n# TYPE {shown} {kind}\n" in text, f"no TYPE {kind} for {shown}"
    got = samples(text)
    n = len(files)
    sent = sum(f.stat().st_size for f in files)
    assert got[("compacs_instances_received_total", ())] == n
    # storescu sends the files' data sets; the node counts them with its own file meta
    assert sent * 0.9 < got[("compacs_bytes_received_total", ())] < sent * 1.1
    key = (("codec", "jpegls"), ("modality", "CT"))
    assert got[("compacs_instances_stored_total", key)] == n
    stored = got[("compacs_bytes_stored_total", key)]
    source = got[("compacs_bytes_stored_source_total", key)]
    stats = nodecheck.node_stats(node)
    assert stored == stats["bytes_stored"] and source == stats["bytes_received"]
    assert got[("compacs_cstore_seconds_count", ())] == n
    assert got[("compacs_cstore_seconds_bucket", (("le", "+Inf"),))] == n
    assert got[("compacs_retrieve_seconds_count", (("operation", "get"),))] == 1
    assert got[("compacs_associations_total", (("result", "accepted"),))] >= 2
    assert got[("compacs_index_seconds_count", ())] >= n
    assert got[("compacs_pending_instances", ())] == 0
    assert got[("compacs_parked_instances", ())] == 0
    assert got[("compacs_fixity_failures_total", ())] == 0
    # The endpoint binds loopback, as [metrics] host does by default
    port = node.metrics_port  # type: ignore[attr-defined]
    assert node.proc is not None
    listening = [
        c.laddr.ip
        for c in psutil.Process(node.proc.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening == ["127.0.0.1"]
    # No patient data and no UID anywhere in the output
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    for value in (ds.StudyInstanceUID, ds.SOPInstanceUID, str(ds.get("PatientID", "")) or None):
        assert value is None or str(value) not in text


def test_each_dashboard_query_names_an_exported_metric(
    ingested: tuple[peers.CompacsProcess, str, list[Path]],
) -> None:
    """Every compacs_* name in deploy/grafana/compacs.json's panel queries is a series the
    node exports (with a sample, or a family shown by HELP/TYPE that has none yet)."""
    _node, text, _files = ingested
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    exported |= set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    dashboard = json.loads(DASHBOARD.read_text())
    queried: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = set(re.findall(r"\bcompacs_[a-z_]+", expr))
            assert names, f"panel {panel['title']!r}: {expr!r} names no compacs metric"
            for name in names:
                queried.setdefault(name, set()).add(panel["title"])
    unknown = {
        name: panels
        for name, panels in queried.items()
        if name not in exported and re.sub(r"_(bucket|sum|count)$", "", name) not in exported
    }
    assert not unknown, f"queried but not exported: {unknown}"
    # and the dashboard shows every metric the issue asks for
    for family, kind in REQUIRED.items():
        shown = f"{family}_total" if kind == "counter" else family
        assert any(q == shown or q.startswith(f"{shown}_") for q in queried), shown


def test_json_logs_one_object_per_line(make_node: MakeNode, tmp_path: Path) -> None:
    """A node with [logging] format = "json": every line of its output parses, and the line
    of a C-STORE names the peer AE, its address and the SOP Instance UID."""
    node = make_node('[logging]\nformat = "json"\n')
    files = dicomdata.real_ct_series(tmp_path / "ct")[:3]
    res = peers.storescu(node.port, files, aet="JSONTEST")
    assert peers.store_ok(res, files), res.stdout[-3000:]
    nodecheck.wait_compressed(node, len(files), timeout=300)
    node.stop()
    # the harness' own lines ("=== 12:00:00 start: ...") aside
    lines = [
        ln for ln in node.log_path.read_text().splitlines() if ln and not ln.startswith("=== ")
    ]
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line: nothing in plain text
        assert {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    for f in files:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        received = [
            e for e in entries if e["message"].startswith("received SOP ") and sop in e["message"]
        ]
        assert len(received) == 1, sop
        assert received[0]["peer_ae"] == "JSONTEST"
        assert received[0]["peer_address"] == "127.0.0.1"
        assert received[0]["sop_instance_uid"] == sop
        assert received[0]["logger"] == "compacs.scp" and received[0]["level"] == "INFO"


def test_worker_processes_log_json(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A real compression worker pool (spawned, with its initializer) logs as the node does."""
    from compacs.service import jobs
    from compacs.service.storage.archive import Archive

    (tmp_path / "c.toml").write_text('[logging]\nformat = "json"\n')
    config = load_config(tmp_path / "c.toml", env={})
    pool = jobs.process_pool(config, Archive(tmp_path / "archive"), workers=1)()
    try:
        pool.submit(_log_in_worker, "from the worker").result(timeout=120)
    finally:
        pool.shutdown()
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if "from the worker" in line]
    assert lines and lines[0]["logger"] == "compacs.test" and lines[0]["level"] == "WARNING"


def _log_in_worker(message: str) -> None:
    import logging

    logging.getLogger("compacs.test").warning(message)


def test_metrics_and_logging_config_errors(tmp_path: Path) -> None:
    def error(text: str, **kwargs) -> str:  # noqa: ANN003
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path, env=kwargs.get("env", {}), overrides=kwargs.get("overrides"))
        return str(info.value)

    msg = error('[logging]\nformat = "xml"\n')
    assert str(tmp_path / "bad.toml") in msg and "format" in msg and '"text", "json"' in msg
    msg = error('[logging]\nlevel = "LOUD"\n')
    assert "[logging] level" in msg and '"WARNING"' in msg
    msg = error("[metrics]\nport = 70000\n")
    assert "[metrics] port" in msg and "from 0 to 65535" in msg
    msg = error("[metrics]\npath = '/x'\n")
    assert "unknown key(s) path" in msg and "allowed keys: port, host" in msg
    msg = error("[node]\nport = 11112\n", env={"COMPACS_METRICS_PORT": "11112"})
    assert "is also a DICOM port" in msg
    msg = error("", env={"COMPACS_METRICS_PORT": "lots"})
    assert "COMPACS_METRICS_PORT" in msg and "from 0 to 65535" in msg
    config = load_config(None, env={"COMPACS_METRICS_PORT": "9464"}, overrides={"metrics_port": 0})
    assert config.metrics.port == 0 and config.metrics.host == "127.0.0.1"


def test_a_metrics_port_in_use_stops_the_node_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "compacs.service.cli", "serve", "--data", str(tmp_path / "d"),
             "--host", "127.0.0.1", "--port", str(peers.free_port()), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            env=peers.CompacsProcess(tmp_path / "d").environment(),
        )  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"compacs: [metrics] cannot listen on 127.0.0.1 port {port}: ")
    assert "--metrics-port" in last


def test_tier_backlog_is_what_the_last_run_left_due(tmp_path: Path) -> None:
    """compacs_tier_backlog_instances{tier}: due and not moved by the last tier run (one
    stopped before its first move leaves all of it), then 0 once a run moved everything."""
    from prometheus_client import REGISTRY
    from test_tiering import Inline, later, make_service, receive

    from compacs.service.tiering import moves

    service = make_service(tmp_path)
    try:
        receive(service, dicomdata.real_ct_series(tmp_path / "ct")[:3])
        moves.run_due(service, "test-node:1", later(), executor=Inline(), stop=lambda: True)
        assert REGISTRY.get_sample_value("compacs_tier_backlog_instances", {"tier": "cold"}) == 3
        assert service.tier_run(later(), executor=Inline()).moved == 3
        assert REGISTRY.get_sample_value("compacs_tier_backlog_instances", {"tier": "cold"}) == 0
    finally:
        service.close()


def test_fallback_reasons_from_compression_notes() -> None:
    notes = [
        "jpegxl: not available",
        "hevc: bits stored 16 > 12",
        "jpegls failed: ValueError: frame 0 does not decode bit-exact",
        "j2k failed: RuntimeError: boom",
        "rle: no gain (10 >= 9 bytes)",
        "htj2k: arrived in that syntax already",
        "pixel data does not decode: broken",
    ]
    names = ["jpegxl", "hevc", "jpegls", "j2k", "rle", "htj2k", "passthrough"]
    assert list(metrics.fallbacks(notes, names)) == [
        ("jpegxl", "unavailable"),
        ("hevc", "unsupported"),
        ("jpegls", "mismatch"),
        ("j2k", "error"),
        ("rle", "no_gain"),
    ]
    assert metrics.modality_label("CT") == "CT"
    assert metrics.modality_label(None) == "unknown"
    assert metrics.modality_label("x" * 40) == "other"
