"""OHIF Viewer 3.13 in a real headless Chromium loads real CT series over DICOMweb.

compacs serves everything from one origin: its DICOMweb root, the viewer's files (``[web]
viewer`` names a copy of OHIF's ``dist/`` with our ``app-config.js``; the viewer's routes live
under ``/ohif`` because ``/`` is compacs' status page) and the status page. One node holds
two series of the real 20-slice CT: one as JPEG-LS (what OHIF decodes itself), one moved by
``compacs tier run`` into a series volume (HEVC, private: compacs must give it out in a public
syntax) on a cold tier. One browser session opens the study list, both studies and the
status page.

The Orthanc case is the HARNESS CHECK: the same viewer against Orthanc's DICOMweb plugin
through the test's proxy (browser.ViewerServer), so that a failure against compacs can be
told from one of the harness (OHIF, Chromium, these assertions). It runs with
COMPACS_TESTS_HARNESS_CHECK=1 only: it costs a third of this file's time, and the suite's
time is tight (run it when the compacs case fails, or after upgrading OHIF or Chromium).
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import browser
import dicomdata
import imagecodecs
import numpy as np
import peers
import pydicom
import pytest
from dicomweb_servers import (
    EXPLICIT_LE,
    JPEG_LS_LOSSLESS,
    connection,
    get,
    multipart_parts,
    orthanc_dicomweb_config,
    orthanc_server,
    root_path,
    stow,
    transfer_syntax_of,
    wait_compressed,
)
from pydicom.uid import CTImageStorage, JPEGLSLossless, generate_uid

from compacs.models.training.data import ct_series_files

pytestmark = pytest.mark.peers

# Grey-level standard deviation (0..255) above which a region holds an image: a blank or
# black viewport measures ~0, the CT slice tens.
NOT_FLAT = 8.0
FRAMES_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
VIEWER_BASE = "/ohif"  # compacs' "/" is its status page
GOP_SIZE = 4  # the cold tier's groups: a slice of the 20-slice volume decodes 4 frames, not 20


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    """OHIF's dist/ (npm pack once, cached outside the repository) and Chromium installed."""
    try:
        browser.ensure_chromium()
        return browser.ohif_dist()
    except peers.PeerError as exc:
        if os.environ.get("COMPACS_TESTS_SKIP_NO_PEERS") == "1":
            pytest.skip(f"browser peers unavailable: {exc}")
        pytest.fail(f"browser peers unavailable: {exc}", pytrace=False)


@dataclass
class Study:
    uid: str
    label: str  # PatientID and family name: what the study list shows of it
    files: list[Path]


def real_ct_series(out: Path) -> Study:
    """The real 20-slice CT series as JPEG-LS lossless, with fresh UIDs (one study, one
    series) and a label of its own (PatientID, and the family name, which OHIF's study
    list shows), so the study list row is this run's.

    Re-coded here from its JPEG 2000 rather than by the server: Orthanc 1.10's GDCM
    decoder crashes (SIGSEGV) transcoding these files at ingest.
    """
    study, series = generate_uid(), generate_uid()
    label = "OHIF-" + study[-8:]
    files = []
    for src in ct_series_files():
        path = dicomdata.fresh_copy(
            src,
            out,
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            PatientID=label,
            PatientName=f"{label}^HARNESS",
        )
        ds = pydicom.dcmread(path)
        # the TotalSegmentator copies carry an empty SOP Class UID; OHIF skips (with a
        # warning sign) the series whose SOP class it does not know
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.compress(JPEGLSLossless, ds.pixel_array, encoding_plugin="pyjpegls")
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(study, label, files)


# --------------------------------------------------------------------------- compacs


@dataclass
class Compacs:
    node: peers.CompacsProcess
    origin: str
    metrics_port: int
    hot: Study  # stored as JPEG-LS
    cold: Study  # a series volume on the cold tier

    @property
    def root(self) -> str:
        return self.origin + "/dicomweb"


NODE_CONFIG = """
[web]
port = {web}
viewer = "{viewer}"

[metrics]
port = {metrics}

[tiering]
stable_minutes = 0
cpu_share = 1
every_minutes = 0

[[tiers]]
name = "cold"
after_days = 30
codecs = [{{ codec = "hevc", params = {{ gop_size = {gop} }} }}]
form = "volume"
"""


@pytest.fixture(scope="module")
def compacs(
    tmp_path_factory: pytest.TempPathFactory, ohif_dist: Path, debian_peers: None
) -> Iterator[Compacs]:
    """One node serving DICOMweb, the viewer and its status page on one port, holding a
    series moved to the cold tier as a volume and one stored as JPEG-LS (stored in that
    order: `tier run` moves whatever is due, so the hot one comes after it)."""
    tmp = tmp_path_factory.mktemp("ohif-compacs")
    viewer = browser.viewer_folder(ohif_dist, tmp / "viewer", "/dicomweb", VIEWER_BASE)
    web, metrics = peers.free_port(), peers.free_port()
    config = tmp / "compacs.toml"
    config.write_text(NODE_CONFIG.format(web=web, viewer=viewer, metrics=metrics, gop=GOP_SIZE))
    node = peers.CompacsProcess(tmp / "data", config=config)
    node.start()
    try:
        root = f"http://127.0.0.1:{web}/dicomweb"
        cold = real_ct_series(tmp / "cold")
        stow(root, cold.files)
        wait_compressed(f"http://127.0.0.1:{web}", len(cold.files))
        res = node.cli(
            "tier", "run", "--config", str(config), "--data", str(node.data_dir),
            "--as-of", "2099-01-01",
        )  # fmt: skip
        assert res.returncode == 0 and "20 instance(s) moved" in res.stdout, res.stdout + res.stderr
        hot = real_ct_series(tmp / "hot")
        stow(root, hot.files)  # acknowledged when durable: in JPEG-LS as it arrived
        yield Compacs(node, f"http://127.0.0.1:{web}", metrics, hot, cold)
    finally:
        print(f"\n----- compacs log tail ({node.log_path}) -----\n{node.log_tail(60)}")
        node.stop()


def volume_frames_decoded(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    found = re.search(r"^compacs_volume_frames_decoded_total (\S+)$", text, re.MULTILINE)
    assert found, "compacs_volume_frames_decoded_total missing from /metrics"
    return float(found.group(1))


def test_a_frame_of_a_cold_series_volume_decodes_only_its_group(compacs: Compacs) -> None:
    """Before the browser test (which reads the whole volume): the first read of one slice
    decodes its group of GOP_SIZE frames, not the 20-frame series; the answer is in a
    public syntax and holds the slice's own pixels."""
    middle = pydicom.dcmread(compacs.cold.files[len(compacs.cold.files) // 2])
    path = (
        f"/dicomweb/studies/{middle.StudyInstanceUID}/series/{middle.SeriesInstanceUID}"
        f"/instances/{middle.SOPInstanceUID}/frames/1"
    )
    before = volume_frames_decoded(compacs.metrics_port)
    conn = connection(compacs.root)
    status, ctype, body = get(conn, path, FRAMES_ANY)
    assert status == 200, body[:500]
    assert volume_frames_decoded(compacs.metrics_port) - before == GOP_SIZE
    again = get(conn, path, FRAMES_ANY)  # the group is kept: nothing decoded again
    conn.close()
    assert again[0] == 200 and volume_frames_decoded(compacs.metrics_port) - before == GOP_SIZE

    [(headers, payload)] = multipart_parts(ctype, body)
    syntax = transfer_syntax_of(headers["content-type"])
    assert syntax in (JPEG_LS_LOSSLESS, EXPLICIT_LE), headers  # public, never the HEVC one
    expected = middle.pixel_array
    if syntax == JPEG_LS_LOSSLESS:
        got = imagecodecs.jpegls_decode(payload)
    else:
        got = np.frombuffer(payload, expected.dtype.newbyteorder("<"))
    assert np.array_equal(np.asarray(got).reshape(expected.shape), expected)


def test_ohif_on_compacs_lists_and_renders_hot_and_cold_series_and_the_status_page(
    compacs: Compacs, tmp_path: Path
) -> None:
    assert stored_syntax(compacs.root, compacs.hot.uid) == JPEG_LS_LOSSLESS
    origin, dicomweb = compacs.origin, compacs.root + "/"
    with browser.browser(tmp_path / "chromium") as tools:
        study_list(tools, origin + VIEWER_BASE, [compacs.hot, compacs.cold], tmp_path)
        for name, study in (("hot", compacs.hot), ("cold", compacs.cold)):
            spread = show_study(
                tools,
                f"{origin}{VIEWER_BASE}/viewer?StudyInstanceUIDs={study.uid}",
                dicomweb,
                tmp_path / f"viewer-{name}.png",
            )
            assert spread > NOT_FLAT, f"{name} series: viewport centre flat (std {spread:.1f})"

        tools.navigate(origin + "/")
        svgs = tools.wait_for(
            "the status page's plots",
            lambda: tools.evaluate("document.querySelectorAll('body svg').length"),
            timeout=30,
        )
        page = tools.screenshot()
        text = tools.evaluate("document.body.innerText")
        log = tools.log

    (tmp_path / "status.png").write_bytes(page)
    print(f"screenshots in {tmp_path}")
    assert svgs >= 2, "the status page draws two plots (ratio by codec, ingest rate)"
    assert browser.region_spread(page) > 1.0, "status page screenshot blank"
    # the cold series by its codec and tier, the hot one kept as it arrived (JPEG-LS)
    assert re.search(r"^hevc\t20\t", text, re.MULTILINE), text[:3000]
    assert re.search(r"^cold\t20\t", text, re.MULTILINE), text[:3000]
    judge(log, origin, dicomweb, frames=len(compacs.hot.files) + len(compacs.cold.files))


# --------------------------------------------------------------------------- harness check


@pytest.mark.skipif(
    os.environ.get("COMPACS_TESTS_HARNESS_CHECK") != "1",
    reason="the Orthanc harness check runs with COMPACS_TESTS_HARNESS_CHECK=1",
)
def test_harness_check_ohif_on_orthanc(make_orthanc, ohif_dist: Path, tmp_path: Path) -> None:
    proc = make_orthanc(ingest_transcoding=JPEG_LS_LOSSLESS, extra_config=orthanc_dicomweb_config())
    server = orthanc_server(proc)
    study = real_ct_series(tmp_path / "in")
    server.store(study.files)
    assert stored_syntax(server.root, study.uid) == JPEG_LS_LOSSLESS
    with (
        browser.ViewerServer(ohif_dist, server.root) as viewer,
        browser.browser(tmp_path / "chromium") as tools,
    ):
        study_list(tools, viewer.origin + "/", [study], tmp_path)
        spread = show_study(
            tools,
            f"{viewer.origin}/viewer?StudyInstanceUIDs={study.uid}",
            viewer.dicomweb_url + "/",
            tmp_path / "viewer.png",
        )
        log = tools.log
    assert spread > NOT_FLAT, f"viewport centre flat (std {spread:.1f})"
    assert viewer.errors == []
    judge(log, viewer.origin, viewer.dicomweb_url + "/", frames=len(study.files))


# --------------------------------------------------------------------------- helpers


def stored_syntax(root: str, study: str) -> str | None:
    """The syntax `transfer-syntax=*` gives frame 1 of the study's first instance in: the
    stored one, which the browser must decode itself."""
    conn = connection(root)
    base = root_path(root)
    status, _, body = get(conn, f"{base}/studies/{study}/series", "application/dicom+json")
    assert status == 200, body[:500]
    series = json.loads(body)[0]["0020000E"]["Value"][0]
    status, _, body = get(
        conn, f"{base}/studies/{study}/series/{series}/instances", "application/dicom+json"
    )
    sop = json.loads(body)[0]["00080018"]["Value"][0]
    status, ctype, body = get(
        conn, f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1", FRAMES_ANY
    )
    conn.close()
    assert status == 200, body[:500]
    [(headers, _)] = multipart_parts(ctype, body)
    return transfer_syntax_of(headers["content-type"])


def study_list(tools: browser.DevTools, url: str, studies: list[Study], out: Path) -> None:
    """The study list at `url` shows a row of each study (by the patient's family name:
    OHIF shows no PatientID column)."""
    tools.navigate(url)
    labels = json.dumps([s.label for s in studies])
    tools.wait_for(
        f"study list rows of {labels}",
        lambda: tools.evaluate(
            f"{labels}.every(l => (document.body?.innerText ?? '').includes(l))"
        ),
        timeout=60,
    )
    (out / "study-list.png").write_bytes(tools.screenshot())


def show_study(tools: browser.DevTools, url: str, dicomweb: str, shot: Path) -> float:
    """Open the viewer at `url`, wait for an image in the viewport centre and for the
    DICOMweb requests to finish; the centre's grey-level spread."""
    tools.navigate(url)
    centre = browser.viewport_centre(tools)
    tools.wait_for(
        "an image in the viewport centre",
        lambda: browser.region_spread(tools.screenshot(centre)) > NOT_FLAT,
        timeout=60,
        interval=0.5,
    )
    tools.wait_network_idle(dicomweb)
    shot.write_bytes(tools.screenshot())
    return browser.region_spread(tools.screenshot(centre))


def judge(log: browser.PageLog, origin: str, dicomweb: str, frames: int) -> None:
    """What a viewer session must have done: nothing left the origin, series metadata and
    one frame request per instance, every DICOMweb request 2xx, no file failing to load, no
    console error."""
    leaving = [
        r.url
        for r in log.requests.values()
        if not r.url.startswith((origin + "/", "data:", "blob:"))
    ]
    assert leaving == [], "requests left the loopback origin"
    calls = log.under(dicomweb)
    assert any(r.url.endswith("/metadata") for r in calls), [r.url for r in calls]
    frame_urls = {r.url for r in calls if "/frames/" in r.url}
    assert len(frame_urls) == frames, sorted(frame_urls)
    bad = [
        (r.method, r.url, r.status, r.failed)
        for r in calls
        if r.failed or r.status is None or not 200 <= r.status < 300
    ]
    assert bad == [], "DICOMweb requests that did not answer 2xx"
    # other loads (OHIF's own files) must not fail; a worker's script loads are answered in
    # the worker's target, so their status may be unknown here
    broken = [
        (r.url, r.status, r.failed)
        for r in log.requests.values()
        if r.failed or (r.status is not None and not 200 <= r.status < 300)
    ]
    assert broken == [], "viewer files that failed to load"
    assert log.console_errors == []
