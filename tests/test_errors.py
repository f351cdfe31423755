"""What a user or a peer gets wrong is answered in one line or one status with its reason.

The command line: an unreachable PostgreSQL, a wrong index URL scheme, a port already in use
(refused before any worker process starts), a database holding another application's tables,
an unwritable data folder: each is one line on stderr and exit 2, the traceback only with -v
(after the subcommand too). A broken onnxruntime (a real ImportError, from a package on
PYTHONPATH) makes the learned codec unavailable with its reason, and the node still serves.
The network: C-FIND, C-GET and C-MOVE identifiers that cannot be matched get 0xA900 with an
Error Comment; a listed C-MOVE destination that cannot be reached fails every sub-operation
with 0xA702 and says why; DCMTK peers see compacs' own Implementation Class UID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dicomdata
import peers
import psutil
import pydicom
import pytest
from nodecheck import node_stats, store_all, wait_compressed

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service.dimse.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

BROKEN_ONNXRUNTIME = 'raise ImportError("libonnxruntime.so.1: cannot open shared object file")\n'
LEARNED_FIRST = """
[[rules]]
name = "ct-learned"
match = { Modality = "CT" }
codecs = ["learned", "jpegls"]
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without COMPACS_* (a developer's index URL must never leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACS_")}
    env.update(extra)
    return env


def compacs(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "compacs.service.cli", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        cwd=cwd,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (exit 2, no traceback), returned."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("compacs: "), res.stderr
    return lines[0]


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: connecting is refused)."""
    return peers.free_port()


# --- the command line -------------------------------------------------------------------


def test_unreachable_postgresql_is_one_line_and_v_after_the_subcommand_adds_the_trace(
    tmp_path: Path,
) -> None:
    pytest.importorskip("psycopg")  # the driver is there: the error is the connection's
    url = f"postgresql+psycopg://compacs:secret@127.0.0.1:{closed_port()}/pacs"
    env = _env(COMPACS_INDEX_URL=url)
    serve = ["serve", "--data", str(tmp_path / "d"), "--host", "127.0.0.1"]
    serve += ["--port", str(peers.free_port())]
    line = one_line(compacs(*serve, env=env))
    assert "COMPACS_INDEX_URL" in line and "cannot connect to the database" in line
    assert "Connection refused" in line and "secret" not in line  # the password is masked
    (tmp_path / "d" / "archive").mkdir(parents=True)
    assert "cannot connect to the database" in one_line(
        compacs("stats", "--data", str(tmp_path / "d"), env=env)
    )
    for verbose in ([*serve[:1], "-v", *serve[1:]], ["-v", *serve]):
        res = compacs(*verbose, env=env)
        assert res.returncode == 2
        assert "Traceback (most recent call last)" in res.stderr, res.stderr[-2000:]
        assert res.stderr.rstrip().splitlines()[-1] == line


@pytest.mark.parametrize("url", ["mysql://u@db/pacs", "postgres://u@db/pacs", "index.sqlite"])
def test_wrong_index_url_scheme_names_the_source_the_key_and_the_allowed(
    url: str, tmp_path: Path
) -> None:
    data = tmp_path / "d"
    line = one_line(compacs("serve", "--data", str(data), env=_env(COMPACS_INDEX_URL=url)))
    assert "COMPACS_INDEX_URL" in line and "[node] index_url" in line
    assert "postgresql+psycopg" in line and "sqlite" in line
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\nindex_url = "{url}"\n')
    line = one_line(compacs("stats", "--config", str(cfg), "--data", str(data)))
    assert str(cfg) in line and "index_url" in line
    assert not data.exists()  # nothing was created for a config that does not load


def test_port_in_use_is_refused_before_any_worker_process_starts(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    data = tmp_path / "d"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "compacs.service.cli", "serve", "--data", str(data)]
            + ["--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        # Worker processes are spawned children that take a second or more to import their
        # libraries: polling the process tree until it exits sees any that were started.
        children: set[str] = set()
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                children |= {" ".join(c.cmdline()) for c in me.children(recursive=True)}
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        holder.close()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = one_line(res)
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line
    assert children == set(), children
    assert not (data / "index.sqlite").exists()  # the index was not opened either


def test_database_with_other_tables_says_what_is_there_and_what_to_do(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "d"
    (data / "archive").mkdir(parents=True)
    with sqlite3.connect(data / "index.sqlite") as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    for args in (
        ["serve", "--data", str(data), "--host", "127.0.0.1", "--port", str(peers.free_port())],
        ["stats", "--data", str(data)],
        ["db", "upgrade", "--data", str(data)],
    ):
        line = one_line(compacs(*args))
        assert "2 table(s) that are not compacs'" in line and "customers, invoices" in line
        assert "empty database of its own" in line and "COMPACS_INDEX_URL" in line
        assert "start `compacs serve` once" not in line
    with sqlite3.connect(data / "index.sqlite") as db:  # and nothing was added to it
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"invoices", "customers"}


def test_unwritable_data_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    port = str(peers.free_port())
    line = one_line(compacs("serve", "--data", str(blocker / "data"), "--port", port))
    assert f"data folder {blocker / 'data'}: cannot write there" in line and "--data" in line
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the read-only file system case cannot be made")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {res.stderr.strip()}")
    try:  # root writes anywhere os.access says no; a read-only file system stops root too
        line = one_line(compacs("serve", "--data", str(readonly), "--port", port))
        assert "cannot write there (Read-only file system)" in line
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)


def test_verbose_is_accepted_after_every_subcommand(tmp_path: Path) -> None:
    for args in (["codec", "list", "-v"], ["stats", "-v", "--data", str(tmp_path)]):
        res = compacs(*args)
        assert "unrecognized arguments" not in res.stderr, res.stderr
    res = compacs("stats", "-v", "--data", str(tmp_path))
    assert res.returncode == 2 and "Traceback" in res.stderr and "no compacs archive" in res.stderr
    assert "Traceback" not in compacs("stats", "--data", str(tmp_path)).stderr


# --- a codec dependency that is missing or broken ------------------------------------------


@pytest.fixture
def broken_onnxruntime(tmp_path: Path) -> dict[str, str]:
    """An environment whose `import onnxruntime` raises a real ImportError (a package on
    PYTHONPATH that fails as a wheel for another CPU does), for the CLI and the node's
    spawned workers alike."""
    package = tmp_path / "shadow" / "onnxruntime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BROKEN_ONNXRUNTIME)
    return {"PYTHONPATH": str(package.parent)}


def test_missing_onnxruntime_is_a_reason_in_codec_list_and_rules_explain(
    broken_onnxruntime: dict[str, str], tmp_path: Path
) -> None:
    env = _env(**broken_onnxruntime)
    res = compacs("codec", "list", env=env)
    assert res.returncode == 0, res.stderr
    assert "learned: needs onnxruntime: pip install 'compacs[cpu]'" in res.stdout
    assert "cannot open shared object file" in res.stdout  # what the import said
    assert "jpegls: needs" not in res.stdout
    cfg = tmp_path / "c.toml"
    cfg.write_text(LEARNED_FIRST)
    ct = dicomdata.ct_series(tmp_path / "ct", 1)[0]
    res = compacs("rules", "explain", "--config", str(cfg), str(ct), env=env)
    assert res.returncode == 0, res.stderr
    assert "codec learned: skipped: needs onnxruntime: pip install 'compacs[cpu]'" in res.stdout
    assert "codec jpegls: WOULD BE USED" in res.stdout
    res = compacs("codec", "list")  # without the shadow package: available
    assert "learned: needs" not in res.stdout


def test_node_without_onnxruntime_serves_and_the_rule_falls_to_its_next_codec(
    make_node, broken_onnxruntime: dict[str, str], tmp_path: Path
) -> None:
    node = make_node(LEARNED_FIRST, env=broken_onnxruntime)
    files = dicomdata.ct_series(tmp_path / "ct", 2)
    store_all(node, files)
    stats = wait_compressed(node, len(files))
    assert stats["by_codec"]["jpegls"]["instances"] == 2, stats["by_codec"]
    assert stats["parked"] == 0
    warned = [line for line in node.log_text().splitlines() if "is not available" in line]
    assert len(warned) == 1, warned  # once, at start
    assert "rule 'ct-learned': codec learned is not available (needs onnxruntime" in warned[0]
    assert "instead: the next codec, jpegls" in warned[0]
    assert "Traceback" not in node.log_text()


def _learned_session_threads() -> list[int]:
    """In a process: the ONNX Runtime intra-op threads of the learned codec's sessions."""
    model = registry.get("learned").model
    sessions = (model.full, model.step, model.narrow_step)
    return [s.get_session_options().intra_op_num_threads for s in sessions]


@pytest.mark.skipif(not registry.get("learned").is_available(), reason="no onnxruntime here")
def test_compression_workers_run_onnx_runtime_on_one_thread(tmp_path: Path) -> None:
    """A worker process as the node spawns it (jobs.worker_init): one thread per session,
    where a command on its own (this process) keeps ONNX Runtime's default (0: all cores)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from compacs.service import jobs
    from compacs.service.config import load_config

    rules = load_config(None).rules
    with ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=jobs.worker_init,
        initargs=(str(tmp_path / "archive"), rules),
    ) as pool:
        assert pool.submit(_learned_session_threads).result(timeout=300) == [1, 1, 1]
    assert _learned_session_threads()[0] == 0


# --- what PS3.5 forbids an encoder --------------------------------------------------------


def _fmt(photometric: str, bits: int, samples: int = 3) -> PixelFormat:
    return PixelFormat(64, 64, samples, bits, bits, 0, photometric)


def test_jpegls_and_rle_refuse_what_ps35_forbids() -> None:
    jpegls, rle = registry.get("jpegls"), registry.get("rle")
    for codec in (jpegls, rle):
        assert codec.unsupported_reason(_fmt("YBR_FULL", 8)) is None
        assert "YBR_FULL with BitsAllocated 16" in (codec.unsupported_reason(_fmt("YBR_FULL", 16)))
        assert codec.unsupported_reason(_fmt("RGB", 16)) is None
    assert "RGB with BitsAllocated 32" in rle.unsupported_reason(_fmt("RGB", 32))
    assert rle.unsupported_reason(_fmt("MONOCHROME2", 32, samples=1)) is None
    signed_palette = PixelFormat(64, 64, 1, 16, 12, 1, "PALETTE COLOR")
    assert "unsigned" in jpegls.unsupported_reason(signed_palette)
    assert registry.get("j2k").unsupported_reason(_fmt("YBR_FULL", 16)) is None  # PS3.5 allows


def test_a_16_bit_ybr_full_image_falls_to_the_next_codec(tmp_path: Path) -> None:
    """A real 16-bit colour image labelled YBR_FULL: JPEG-LS may not take it (PS3.5 8.2.3),
    so `codec encode` refuses with the reason and a rule goes on to JPEG 2000."""
    ds = pydicom.dcmread(dicomdata.testdata_path("SC_rgb_16bit.dcm"))
    ds.PhotometricInterpretation = "YBR_FULL"
    src = tmp_path / "ybr16.dcm"
    ds.save_as(src)
    res = compacs("codec", "encode", "--codec", "jpegls", str(src), str(tmp_path / "o.dcm"))
    assert res.returncode == 2 and "jpegls not applied" in res.stderr, res.stderr
    assert "YBR_FULL with BitsAllocated 16" in res.stderr and "PS3.5" in res.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[rules]]\nname = "all"\nmatch = {}\ncodecs = ["jpegls", "j2k"]\n')
    res = compacs("rules", "explain", "--config", str(cfg), str(src))
    assert "codec jpegls: skipped: YBR_FULL with BitsAllocated 16" in res.stdout, res.stdout
    assert "codec j2k: WOULD BE USED" in res.stdout
    res = compacs("codec", "encode", "--codec", "rle", str(src), str(tmp_path / "o.dcm"))
    assert res.returncode == 2 and "rle not applied" in res.stderr


def test_rle_refuses_32_bit_rgb(tmp_path: Path) -> None:
    src = dicomdata.testdata_path("SC_rgb_32bit.dcm")
    res = compacs("codec", "encode", "--codec", "rle", str(src), str(tmp_path / "o.dcm"))
    assert res.returncode == 2, res.stdout
    assert "rle not applied: rle: RGB with BitsAllocated 32" in res.stderr


# --- statuses on the network --------------------------------------------------------------


def _status_detail(output: str) -> tuple[str, str]:
    """(the final DIMSE status line, the Error Comment) from a DCMTK tool's -d output."""
    statuses = [line for line in output.splitlines() if "DIMSE Status" in line]
    comments = [line for line in output.splitlines() if "ErrorComment" in line]
    return (statuses[-1] if statuses else "", comments[-1] if comments else "")


@pytest.fixture
def stored(make_node, make_storescp, tmp_path: Path):
    """A node with two CT slices of one study; DEAD (closed port) and FULL (a listener whose
    backlog is full, so a connect times out) are listed in [move_destinations]."""
    storescp = make_storescp(extra=("+xa", "-d"))
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    waiting = []  # fill the accept queue: the kernel drops further SYNs
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", full.getsockname()[1]))
        waiting.append(s)
    node = make_node(
        "[move_destinations]\n"
        f'STORESCP = "127.0.0.1:{storescp.port}"\n'
        f'DEAD = "127.0.0.1:{closed_port()}"\n'
        f'FULL = "127.0.0.1:{full.getsockname()[1]}"\n'
    )
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "ct", 2, study_uid=study)
    store_all(node, files)
    wait_compressed(node, len(files))
    yield node, storescp, study, files
    for s in [*waiting, full]:
        s.close()


def test_identifiers_that_cannot_be_matched_get_a900_with_the_reason(
    stored, tmp_path: Path
) -> None:
    node, _storescp, study, _files = stored
    res = peers.getscu(
        node.port, "SERIES", {"StudyInstanceUID": study}, tmp_path / "g", extra=["-d"]
    )
    status, comment = _status_detail(res.stdout)
    assert "0xa900" in status, res.stdout[-3000:]
    assert "a SERIES retrieve needs SeriesInstanceUID in the identifier" in comment
    res = peers.movescu(node.port, "PATIENT", {"StudyInstanceUID": study}, "DEAD", extra=["-d"])
    status, comment = _status_detail(res.stdout)
    assert "0xa900" in status, res.stdout[-3000:]  # refused before any connection to DEAD
    assert "a PATIENT retrieve needs PatientID in the identifier" in comment
    res = peers.findscu(node.port, "VOLUME", {"StudyInstanceUID": study}, extra=["-d"])
    status, comment = _status_detail(res.stdout)
    assert "0xa900" in status and "VOLUME" in comment, res.stdout[-3000:]
    res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "NOWHERE", extra=["-d"])
    status, comment = _status_detail(res.stdout)
    assert "0xa801" in status and "'NOWHERE' not in [move_destinations]" in comment
    # and the node still answers: a good C-GET after the refusals
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, tmp_path / "ok")
    assert "Final status report" in res.stdout and len(list((tmp_path / "ok").iterdir())) == 2


def test_move_to_a_listed_destination_that_does_not_answer_fails_with_a702(stored) -> None:
    node, storescp, study, files = stored
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    for destination, why in (
        ("DEAD", "connection refused"),
        ("FULL", "TCP connect timed out (10 s)"),
    ):
        res = peers.movescu(
            node.port, "STUDY", {"StudyInstanceUID": study}, destination, extra=["-d"]
        )
        status, comment = _status_detail(res.stdout)
        assert "0xa702" in status, res.stdout[-3000:]  # not 0xa801: the destination is known
        assert f"move destination {destination}: {why}" in comment, comment
        assert "Failed Suboperations          : 2" in res.stdout
        assert "Completed Suboperations       : 0" in res.stdout
        assert all(uid in res.stdout for uid in uids)  # the Failed SOP Instance UID List
        assert f"destination {destination} at 127.0.0.1" in node.log_text()
    res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "STORESCP")
    assert "Received Final Move Response (Success)" in res.stdout, res.stdout[-3000:]
    assert len(storescp.received()) == 2
    assert node_stats(node)["instances"] == 2


def test_dcmtk_peers_see_compacs_implementation_uid_and_version(stored, tmp_path: Path) -> None:
    """As acceptor (echoscu) and as requestor: the C-MOVE sub-association and `compacs send`,
    seen by storescp -d."""
    node, storescp, study, files = stored
    res = peers.run_dcmtk("echoscu", "-d", "-aec", node.ae_title, "127.0.0.1", str(node.port))
    assert res.returncode == 0, res.stdout[-2000:]
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in res.stdout
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in res.stdout
    assert IMPLEMENTATION_VERSION_NAME == "COMPACS_010"
    res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "STORESCP")
    assert "Final Move Response (Success)" in res.stdout
    res = compacs("send", "--to", f"STORESCP@127.0.0.1:{storescp.port}", str(files[0]))
    assert res.returncode == 0, res.stderr
    # storescp -d dumps each association's parameters, the requestor's as "Their ..."
    lines = storescp.log_text().splitlines()
    theirs = [ln.split(":", 2)[2].strip() for ln in lines if "Their Implementation Class" in ln]
    # (twice per association: the request as received, the parameters as accepted)
    assert sum("I: Association Release" in ln for ln in lines) == 2  # C-MOVE's and send's
    theirs = [uid for uid in theirs if uid]
    assert len(theirs) >= 2 and set(theirs) == {IMPLEMENTATION_CLASS_UID}, theirs
    names = [ln.split(":", 2)[2].strip() for ln in lines if "Their Implementation Version" in ln]
    assert {name for name in names if name} == {IMPLEMENTATION_VERSION_NAME}, names
