"""DICOMweb against a real `compacs serve` (its web face on a free port): STOW-RS through
the same ingest as C-STORE, QIDO-RS matched by the C-FIND code path, WADO-RS instances,
metadata, frames (stored bytes with transfer-syntax=*, decoded or transcoded otherwise)
and rendered images, pixels compared bit-exact with what was sent; the status page.

One node serves the round-trip tests of this module (module-scoped through a factory of
its own), so the module starts two processes in all, not one per test.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicomdata  # noqa: E402
import peers  # noqa: E402
from dicomweb_servers import wait_compressed  # noqa: E402

from compacs.codecs import registry  # noqa: E402
from compacs.codecs.base import PixelFormat  # noqa: E402

pytestmark = pytest.mark.peers

JPEG_LS = "1.2.840.10008.1.2.4.80"
HTJ2K = "1.2.840.10008.1.2.4.201"
JPEG_XL = "1.2.840.10008.1.2.4.110"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# Two rules, not the defaults: the big noise object of the streaming test is kept as it
# arrived rather than tried in JPEG-LS (seconds of a useless encode, waited for at stop).
RULES = """
[[rules]]
name = "big-noise"
match = { NumberOfFrames = { min = 30 } }
codecs = ["passthrough"]

[[rules]]
name = "the-rest"
match = {}
codecs = ["jpegls"]
"""


def web_node(tmp: Path, config: str = RULES) -> tuple[peers.CompacsProcess, int]:
    port = peers.free_port()
    cfg = tmp / "compacs.toml"
    cfg.write_text(config)
    node = peers.CompacsProcess(tmp / "data", config=cfg, extra_args=["--web-port", str(port)])
    node.start()
    return node, port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A node with its web face, and what was sent to it by STOW-RS: a 3-slice 512² CT
    series (uncompressed; stored as JPEG-LS) and a 10-frame MR already in JPEG-LS."""
    peers.ensure_debian_packages()
    tmp = tmp_path_factory.mktemp("dicomweb")
    node, port = web_node(tmp)
    study = generate_uid()
    ct = dicomdata.ct_series(tmp / "in", 3, study, PatientID="WEB-1", PatientName="WEB^ONE")
    mf = dicomdata.fresh_copy(
        "emri_small_jpeg_ls_lossless.dcm", tmp / "in", StudyInstanceUID=study,
        PatientID="WEB-1", PatientName="WEB^ONE",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/dicomweb"
    client = DICOMwebClient(url)
    sent = [pydicom.dcmread(p) for p in [*ct, mf]]
    answer = client.store_instances(sent)
    wait_compressed(f"http://127.0.0.1:{port}", 4)
    yield {"node": node, "url": url, "client": client, "study": study, "sent": sent,
           "answer": answer, "tmp": tmp, "port": port}  # fmt: skip
    node.stop()


def pixels_of(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array


def frame_array(data: bytes, ref: pydicom.Dataset) -> np.ndarray:
    fmt = PixelFormat.from_dataset(ref)
    return np.frombuffer(data, fmt.dtype).reshape(fmt.rows, fmt.columns)


def test_stow_answer_lists_every_instance(served: dict) -> None:
    answer = served["answer"]
    refs = answer.ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(
        d.SOPInstanceUID for d in served["sent"]
    )
    assert "FailedSOPSequence" not in answer
    assert all(f"/instances/{r.ReferencedSOPInstanceUID}" in r.RetrieveURL for r in refs)


def test_qido_matches_as_cfind(served: dict) -> None:
    client, study = served["client"], served["study"]
    found = client.search_for_studies(search_filters={"PatientID": "WEB-1"})
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    assert found[0]["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
    assert set(found[0]["00080061"]["Value"]) == {"CT", "MR"}
    assert found[0]["00081190"]["Value"][0].endswith(f"/studies/{study}")
    # wildcards and case-insensitive person names; fuzzy matching as a prefix
    assert client.search_for_studies(search_filters={"PatientName": "web*"})
    assert client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "we"})
    assert not client.search_for_studies(search_filters={"PatientName": "we"})
    # UID lists with backslashes (OHIF) and commas (PS3.18)
    other = generate_uid()
    for sep in ("\\", ","):
        got = client.search_for_studies(search_filters={"StudyInstanceUID": f"{other}{sep}{study}"})
        assert len(got) == 1
    series = client.search_for_series(study)
    assert len(series) == 2 and {s["00080060"]["Value"][0] for s in series} == {"CT", "MR"}
    ct_series = next(s for s in series if s["00080060"]["Value"][0] == "CT")
    ct_uid = ct_series["0020000E"]["Value"][0]
    instances = client.search_for_instances(study, ct_uid)
    assert sorted(i["00200013"]["Value"][0] for i in instances) == [1, 2, 3]
    # every level without a parent, and includefield
    everywhere = client.search_for_instances(
        search_filters={"SeriesInstanceUID": ct_uid}, fields=["PatientName"]
    )
    assert len(everywhere) == 3 and everywhere[0]["00100010"]["Value"][0]["Alphabetic"]
    assert client.search_for_series(search_filters={"Modality": "MR"})
    (every,) = client.search_for_studies(
        search_filters={"PatientID": "WEB-1"}, get_remaining=False, fields=["all"]
    )
    assert "1.2.840.10008.5.1.4.1.1.2" in every["00080062"]["Value"]  # SOPClassesInStudy
    assert "00080018" not in every  # no instance-level keys in a study answer


def test_qido_paging_empty_and_bad_requests(served: dict) -> None:
    url, study = served["url"], served["study"]
    page = httpx.get(f"{url}/studies/{study}/instances", params={"limit": 2, "offset": 0})
    assert page.status_code == 200 and len(page.json()) == 2
    assert "additional results" in page.headers["warning"]
    rest = httpx.get(f"{url}/studies/{study}/instances", params={"limit": 2, "offset": 2})
    assert len(rest.json()) == 2 and "warning" not in rest.headers
    assert {i["00080018"]["Value"][0] for i in page.json() + rest.json()} == {
        d.SOPInstanceUID for d in served["sent"]
    }
    # date ranges: the CT template's study date lies in none of these
    assert httpx.get(f"{url}/studies", params={"StudyDate": "19000101-19000102"}).status_code == 204
    bad = httpx.get(f"{url}/studies", params={"NoSuchKey": "1"})
    assert bad.status_code == 400 and "NoSuchKey" in bad.json()["error"]
    bad = httpx.get(f"{url}/studies", params={"StudyDate": "yesterday"})
    assert bad.status_code == 400 and "StudyDate" in bad.json()["error"]
    assert httpx.get(f"{url}/studies", params={"limit": "x"}).status_code == 400


def test_wado_metadata_frames_and_instances_bit_exact(served: dict) -> None:
    client, study, url = served["client"], served["study"], served["url"]
    ct = [d for d in served["sent"] if d.Modality == "CT"]
    series = ct[0].SeriesInstanceUID
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == 3
    assert all("BulkDataURI" in m["7FE00010"] for m in metadata)
    again = httpx.get(f"{url}/studies/{study}/series/{series}/metadata")  # from the cache
    assert again.headers["content-type"] == "application/dicom+json"
    # the same, but for the host in the BulkDataURIs: they keep the caller's Host header
    # (dicomweb-client sends it without the port)
    assert json.dumps(again.json()).replace(f":{served['port']}/", "/") == json.dumps(metadata)
    status_page = httpx.get(f"http://127.0.0.1:{served['port']}/").text
    assert "<td>jpegls</td>" in status_page  # the CT slices, by codec
    for ds in ct:
        sop = ds.SOPInstanceUID
        # uncompressed on request (the client's default), bit-exact
        (native,) = client.retrieve_instance_frames(study, series, sop, [1])
        assert np.array_equal(frame_array(native, ds), pixels_of(ds))
        # the stored JPEG-LS codestream with transfer-syntax=*, decoded here
        raw = httpx.get(
            f"{url}/studies/{study}/series/{series}/instances/{sop}/frames/1",
            headers={
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"
            },
        )
        assert raw.status_code == 200
        assert f"transfer-syntax={JPEG_LS}" in raw.text[:400]
        assert "image/jls" in raw.text[:400]
        whole = client.retrieve_instance(study, series, sop)
        assert np.array_equal(whole.pixel_array, pixels_of(ds))
    mr = next(d for d in served["sent"] if d.Modality == "MR")
    frames = client.retrieve_instance_frames(
        study, mr.SeriesInstanceUID, mr.SOPInstanceUID, [1, 3, 10]
    )
    for number, data in zip([1, 3, 10], frames, strict=True):
        assert np.array_equal(frame_array(data, mr), mr.pixel_array[number - 1])
    past = httpx.get(
        f"{url}/studies/{study}/series/{mr.SeriesInstanceUID}/instances/{mr.SOPInstanceUID}/frames/11"
    )
    assert past.status_code == 400 and "10 frame" in past.json()["error"]
    assert httpx.get(f"{url}/studies/{generate_uid()}/metadata").status_code == 404


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0]
    out = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:-1]:
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        kind = next(
            line.split(":", 1)[1].strip()
            for line in head.decode().split("\r\n")
            if line.lower().startswith("content-type")
        )
        out.append((kind, body[:-2]))
    return out


@pytest.mark.parametrize(
    ("media", "syntax"), [("image/jphc", HTJ2K), ("image/jxl", JPEG_XL), ("image/jls", JPEG_LS)]
)
def test_frames_in_image_media_types(served: dict, media: str, syntax: str) -> None:
    """Media types dicomweb-client refuses, by raw HTTP: transcoded from the stored
    JPEG-LS (or passed through), decoded here bit-exact."""
    codec = registry.by_transfer_syntax(syntax)
    if codec is None or not codec.is_available():
        pytest.fail(f"no available codec for {syntax} in this environment")
    url, study = served["url"], served["study"]
    ds = next(d for d in served["sent"] if d.Modality == "CT")
    path = f"{url}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    got = httpx.get(f"{path}/frames/1", headers={"Accept": f'multipart/related; type="{media}"'})
    assert got.status_code == 200, got.text
    ((kind, body),) = _parts(got)
    assert kind == f"{media}; transfer-syntax={syntax}"
    decoded = codec.decode_frame(body, PixelFormat.from_dataset(ds))
    assert np.array_equal(np.asarray(decoded).reshape(ds.Rows, ds.Columns), pixels_of(ds))
    refused = httpx.get(f"{path}/frames/1", headers={"Accept": "image/gif"})
    assert refused.status_code == 406 and "transfer-syntax=*" in refused.json()["error"]


def test_rendered_thumbnail_and_status_page(served: dict) -> None:
    url, study = served["url"], served["study"]
    png = httpx.get(f"{url}/studies/{study}/thumbnail", headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    ds = next(d for d in served["sent"] if d.Modality == "CT")
    jpeg = httpx.get(
        f"{url}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered",
        headers={"Accept": "image/jpeg"},
    )
    assert jpeg.status_code == 200 and jpeg.content[:2] == b"\xff\xd8"
    page = httpx.get(f"http://127.0.0.1:{served['port']}/")
    assert page.status_code == 200
    assert (
        page.text.count("<svg") == 2
        and "jpegls" in page.text
        and "http" not in page.text.split("<body")[1].replace("http://www.w3.org/2000/svg", "")
    )


def test_stow_conflicts_and_metadata_cache_follows_the_series(served: dict) -> None:
    client, study, url = served["client"], served["study"], served["url"]
    ct = [d for d in served["sent"] if d.Modality == "CT"]
    series = ct[0].SeriesInstanceUID
    before = client.retrieve_series_metadata(study, series)
    extra = dicomdata.ct_series(
        served["tmp"] / "more", 1, study, series_uid=series, PatientID="WEB-1",
        PatientName="WEB^ONE",
    )  # fmt: skip
    client.store_instances([pydicom.dcmread(extra[0])])
    assert len(client.retrieve_series_metadata(study, series)) == len(before) + 1
    # to another study's URL: refused, nothing stored (409 when none was)
    boundary = "b0undary"
    with open(dicomdata.fresh_copy("CT_small.dcm", served["tmp"] / "w2"), "rb") as f:
        part = f.read()
    body = _multipart(boundary, part)
    answer = httpx.post(
        f"{url}/studies/{study}",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    assert answer.status_code == 409
    failed = answer.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA900]
    junk = httpx.post(
        f"{url}/studies",
        content=_multipart(boundary, b"not dicom"),
        headers={"Content-Type": f"multipart/related; boundary={boundary}"},
    )
    assert junk.status_code == 409 and junk.json()["00081198"]["Value"][0]["00081197"]["Value"] == [
        0xC000
    ]
    assert (
        httpx.post(
            f"{url}/studies", content=b"{}", headers={"Content-Type": "application/json"}
        ).status_code
        == 415
    )


def _multipart(boundary: str, *parts: bytes) -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _sha(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def test_private_stored_syntaxes_never_leave_with_transfer_syntax_any() -> None:
    """A series volume or HEVC object asked `transfer-syntax=*`: the first public syntax it
    can be given in, never its private one; uncompressed when that is what is asked."""
    from compacs.service.web import media

    hevc = "2.25.38871254023385371384039355074665861377"
    candidates = [JPEG_LS, EXPLICIT_LE]
    ohif = media.parse_accept(
        "multipart/related; type=application/octet-stream; transfer-syntax=*", media.OCTET
    )
    assert media.choose(ohif, hevc, candidates, lambda ts: True, container=media.OCTET) == (
        "image/jls",
        JPEG_LS,
    )
    plain = media.parse_accept(None, media.OCTET)
    assert media.choose(plain, hevc, candidates, lambda ts: True, container=media.OCTET) == (
        media.OCTET,
        EXPLICIT_LE,
    )
    stored = media.parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=*', media.DICOM
    )
    assert media.choose(stored, JPEG_LS, candidates, lambda ts: True, container=media.DICOM) == (
        media.DICOM,
        JPEG_LS,
    )


def test_a_big_instance_goes_out_from_its_blob_file(served: dict) -> None:
    """An object over wire.STREAM_ABOVE (16-bit noise: no codec gains, so it is kept as
    received) asked in its stored syntax is sent from its blob file chunk by chunk
    (Domain.stream, the path C-GET takes), byte for byte the file STOWed."""
    from compacs.service.wire import STREAM_ABOVE

    ds = pydicom.dcmread(dicomdata.fresh_copy("CT_small.dcm", served["tmp"] / "big"))
    frames = 36
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = "WEB-BIG"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.NumberOfFrames = 15, 0, frames
    noise = np.random.default_rng(24).integers(0, 1 << 16, (frames, 512, 512), dtype="<u2")
    ds.PixelData = noise.tobytes()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    path = served["tmp"] / "big" / "noise.dcm"
    ds.save_as(path, enforce_file_format=True)
    sent = path.read_bytes()
    assert len(sent) > STREAM_ABOVE
    url = served["url"]
    stored = httpx.post(
        f"{url}/studies",
        content=_multipart("b1g", sent),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1g'},
        timeout=120,
    )
    assert stored.status_code == 200, stored.text
    got = httpx.get(
        f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=120,
    )
    assert got.status_code == 200, got.text[:500]
    ((kind, body),) = _parts(got)
    assert kind == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert np.array_equal(pydicom.dcmread(BytesIO(body)).pixel_array, noise)
    assert body == sent
