"""OHIF Viewer 3.13 in a real headless Chromium loads a real CT series over DICOMweb.

The server is a fixture parameter (:func:`dicomweb_server`): a DICOMweb root and a way to
store files. Today its only value is Orthanc with its DICOMweb plugin, the HARNESS CHECK: it
proves that the viewer, the same-origin proxy, the browser and the assertions work, so that a
failure against compacs' web face (added as a second parameter) is compacs' own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import browser
import dicomdata
import peers
import pydicom
import pytest
from dicomweb_servers import (
    JPEG_LS_LOSSLESS,
    DicomWebServer,
    connection,
    get,
    multipart_parts,
    orthanc_dicomweb_config,
    orthanc_server,
    root_path,
    transfer_syntax_of,
)
from pydicom.uid import CTImageStorage, JPEGLSLossless, generate_uid

from compacs.models.data import ct_series_files

pytestmark = pytest.mark.peers

# Grey-level standard deviation (0..255) above which the viewport centre holds an image: a
# blank or black viewport measures ~0, the CT slice tens.
NOT_FLAT = 8.0
FRAMES_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


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


@pytest.fixture(params=[pytest.param("orthanc", id="orthanc-harness-check")])
def dicomweb_server(request: pytest.FixtureRequest, make_orthanc) -> DicomWebServer:
    """The DICOMweb server under test, storing CT as JPEG-LS lossless.

    ``orthanc``: the harness check (Orthanc 1.10 + orthanc-dicomweb, IngestTranscoding
    JPEG-LS). compacs joins as ``"compacs"``: a node with ``[web] port`` set, its root
    ``http://127.0.0.1:PORT/dicomweb``, storing with storescu.
    """
    if request.param == "orthanc":
        proc = make_orthanc(
            ingest_transcoding=JPEG_LS_LOSSLESS, extra_config=orthanc_dicomweb_config()
        )
        return orthanc_server(proc)
    raise AssertionError(f"unknown DICOMweb server {request.param}")


def real_ct_series(out: Path) -> tuple[str, str, list[Path]]:
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
    return study, label, files


def test_ohif_lists_and_renders_a_ct_series(
    dicomweb_server: DicomWebServer, ohif_dist: Path, tmp_path: Path
) -> None:
    study, label, files = real_ct_series(tmp_path / "in")
    dicomweb_server.store(files)

    # the series really is JPEG-LS on the server: the browser must decode it, not get raw
    conn = connection(dicomweb_server.root)
    status, ctype, body = get(
        conn, f"{root_path(dicomweb_server.root)}/studies/{study}/series", "application/dicom+json"
    )
    assert status == 200, body[:500]
    series_uid = json.loads(body)[0]["0020000E"]["Value"][0]
    status, ctype, body = get(
        conn,
        f"{root_path(dicomweb_server.root)}/studies/{study}/series/{series_uid}/instances",
        "application/dicom+json",
    )
    sop = json.loads(body)[0]["00080018"]["Value"][0]
    status, ctype, body = get(
        conn,
        f"{root_path(dicomweb_server.root)}/studies/{study}/series/{series_uid}"
        f"/instances/{sop}/frames/1",
        FRAMES_ANY,
    )
    conn.close()
    assert status == 200, body[:500]
    [(headers, _)] = multipart_parts(ctype, body)
    assert transfer_syntax_of(headers["content-type"]) == JPEG_LS_LOSSLESS, headers

    with (
        browser.ViewerServer(ohif_dist, dicomweb_server.root) as viewer,
        browser.browser(tmp_path / "chromium") as tools,
    ):
        tools.navigate(viewer.origin + "/")
        tools.wait_for(
            f"study list row of {label}",
            lambda: tools.evaluate(
                f"(document.body?.innerText ?? '').includes({json.dumps(label)})"
            ),
            timeout=60,
        )
        (tmp_path / "study-list.png").write_bytes(tools.screenshot())

        tools.navigate(f"{viewer.origin}/viewer?StudyInstanceUIDs={study}")
        centre = browser.viewport_centre(tools)
        tools.wait_for(
            "an image in the viewport centre",
            lambda: browser.region_spread(tools.screenshot(centre)) > NOT_FLAT,
            timeout=60,
            interval=0.5,
        )
        tools.wait_network_idle(viewer.dicomweb_url + "/")
        (tmp_path / "viewer.png").write_bytes(tools.screenshot())
        spread = browser.region_spread(tools.screenshot(centre))
        log = tools.log

    print(f"screenshots: {tmp_path / 'study-list.png'}, {tmp_path / 'viewer.png'}")
    assert spread > NOT_FLAT, f"viewport centre flat (std {spread:.1f})"
    assert viewer.errors == []
    leaving = [
        r.url
        for r in log.requests.values()
        if not r.url.startswith((viewer.origin + "/", "data:", "blob:"))
    ]
    assert leaving == [], "requests left the loopback origin"
    dicomweb = log.under(viewer.dicomweb_url + "/")
    frames = [r for r in dicomweb if "/frames/" in r.url]
    assert any(r.url.endswith("/metadata") for r in dicomweb), [r.url for r in dicomweb]
    assert len({r.url for r in frames}) == len(files), [r.url for r in frames]
    bad = [
        (r.method, r.url, r.status, r.failed)
        for r in dicomweb
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
