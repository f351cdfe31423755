"""`compacs send`, `compacs query` and `compacs pull` (service/dimse/scu/) against real peers.

Orthanc 1.10 is the remote PACS; a compacs node is where pulled studies go. Each test
starts its own peers. Orthanc knows the node as modality COMPACS (its AE title, loopback,
its port): that makes the node a C-MOVE destination, and our commands call with the
node's AE title by default, so Orthanc also answers our find/get/move (it aborts
associations from callers it does not know).

Plus unit tests of the address parser and the association planning (no peers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, raw_pixels, wait_compressed
from pydicom.encaps import generate_frames
from pydicom.uid import UID, generate_uid

from compacs.service.dimse.scu import (
    MAX_CONTEXTS,
    AddressError,
    DicomFile,
    Peer,
    get_contexts,
    parse_peer,
    plan_associations,
)

JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"
HTJ2K = "1.2.840.10008.1.2.4.201"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


# --------------------------------------------------------------------------- helpers


def addr(proc: peers.OrthancProcess | peers.CompacsProcess | peers.StorescpProcess) -> str:
    ae = getattr(proc, "aet", None) or proc.ae_title
    return f"{ae}@127.0.0.1:{proc.port}"


def compacs(*args: str) -> subprocess.CompletedProcess[str]:
    """The `compacs` command without a node (COMPACS_* variables of the caller dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACS_")}
    return subprocess.run(
        [sys.executable, "-m", "compacs.service.cli", *args],
        capture_output=True,
        text=True,
        env={**env, "TCP_NODELAY": "1"},
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def sop_uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def study_files(out: Path) -> tuple[str, list[Path]]:
    """One study of real images in three syntaxes: 3 uncompressed CT slices, a 10-frame
    JPEG-LS enhanced MR and a J2K MR, all of one patient (Orthanc keys studies by patient)."""
    study = generate_uid()
    files = dicomdata.ct_series(out, 3, study)
    same = {"StudyInstanceUID": study, "PatientID": "COMPACS-CT", "PatientName": "COMPACS^CT"}
    files.append(dicomdata.fresh_copy("emri_small_jpeg_ls_lossless.dcm", out, **same))
    files.append(dicomdata.fresh_copy("MR2_J2KR.dcm", out, **same))
    return study, files


@pytest.fixture
def pacs(make_node, make_orthanc) -> tuple[peers.CompacsProcess, peers.OrthancProcess]:
    """A compacs node, and an Orthanc that knows it as modality COMPACS."""
    node = make_node()
    orthanc = make_orthanc(modalities={"COMPACS": ("127.0.0.1", node.port)})
    return node, orthanc


def check_pixel_exact(node: peers.CompacsProcess, study: str, files: list[Path], out: Path):
    """Every original is in the node (exported by its SOP Instance UID), pixels equal."""
    res = node.export(out, study=study)
    assert res.returncode == 0, res.stderr
    exported = exported_by_sop(out)
    assert set(exported) == {sop_uid(f) for f in files}
    for f in files:
        np.testing.assert_array_equal(raw_pixels(exported[sop_uid(f)]), raw_pixels(f))


# --------------------------------------------------------------------------- send


@pytest.mark.peers
def test_send_keeps_each_files_syntax(pacs, tmp_path: Path) -> None:
    """Files of three syntaxes (one folder, recursively, plus a non-DICOM file) arrive in
    Orthanc each in its own syntax: one presentation context per syntax works."""
    node, orthanc = pacs
    folder = tmp_path / "in"
    _study, files = study_files(folder / "sub")
    implicit = dicomdata.fresh_copy("MR_small_implicit.dcm", folder)
    (folder / "notes.txt").write_text("not DICOM")
    res = node.cli("send", "--to", addr(orthanc), str(folder))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sent 6 file(s)" in res.stdout and "failed 0" in res.stdout, res.stdout
    assert "notes.txt" in res.stderr and "not a DICOM file" in res.stderr
    assert [peers.transfer_syntax_of(f) for f in files[3:]] == [JPEG_LS, J2K]
    for f in [*files, implicit]:
        iid = orthanc.find_instance(sop_uid(f))
        assert iid is not None, f"{f.name} did not arrive"
        ts = peers.transfer_syntax_of(f)
        assert orthanc.instance_transfer_syntax(iid) == ts, f.name
    # the JPEG-LS codestream arrived untouched
    ds = pydicom.dcmread(files[3])
    first = next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert orthanc.frame_raw(orthanc.find_instance(ds.SOPInstanceUID), 0) == first


@pytest.mark.peers
def test_send_decodes_when_peer_refuses_syntax(pacs, tmp_path: Path) -> None:
    """Orthanc 1.10 refuses HTJ2K: the file goes uncompressed (explicit VR LE fallback
    context), pixel-exact; a failed file is reported with its status and exit 1."""
    node, orthanc = pacs
    src = dicomdata.ct_series(tmp_path / "src", 1)[0]
    htj2k = tmp_path / "htj2k.dcm"
    res = node.cli("codec", "encode", "--codec", "htj2k", str(src), str(htj2k))
    assert res.returncode == 0, res.stderr
    assert peers.transfer_syntax_of(htj2k) == HTJ2K
    res = node.cli("send", "--to", addr(orthanc), str(htj2k))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sent uncompressed" in res.stderr
    iid = orthanc.find_instance(sop_uid(htj2k))
    assert orthanc.instance_transfer_syntax(iid) == EXPLICIT_LE
    np.testing.assert_array_equal(orthanc.instance_dataset(iid).pixel_array, raw_pixels(src))

    # A file whose SOP Instance UID does not match its header's (0x0000 impossible):
    # Orthanc refuses it; the summary counts it and the exit status is 1.
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(src)
    del ds.SOPInstanceUID
    ds.save_as(bad)
    res = node.cli("send", "--to", addr(orthanc), str(bad), str(src))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "bad.dcm" in res.stdout
    assert "failed 1" in res.stdout


# --------------------------------------------------------------------------- query


@pytest.mark.peers
def test_query_table_and_json(pacs, tmp_path: Path) -> None:
    node, orthanc = pacs
    study, files = study_files(tmp_path / "in")
    for f in files:
        orthanc.upload(f)
    res = node.cli("query", "--from", addr(orthanc), "-k", "PatientID=COMPACS-CT")
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split() == [
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
    ]
    assert len(rows) == 1 and study in rows[0] and "COMPACS-CT" in rows[0]

    res = node.cli(
        "query", "--from", addr(orthanc), "--json", "-k", f"StudyInstanceUID={study}",
        "-k", "SOPClassesInStudy", "-k", "PatientName=COMPACS*",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout)
    assert len(answers) == 1
    answer = answers[0]
    assert answer["StudyInstanceUID"] == study
    assert answer["NumberOfStudyRelatedInstances"] == "5"
    assert sorted(answer["ModalitiesInStudy"]) == ["CT", "MR"]
    assert "1.2.840.10008.5.1.4.1.1.2" in answer["SOPClassesInStudy"]

    # series level, patient root: one row per series
    res = node.cli(
        "query", "--from", addr(orthanc), "--json", "--model", "patient", "--level", "series",
        "-k", "PatientID=COMPACS-CT", "-k", f"StudyInstanceUID={study}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)) == 3

    res = node.cli("query", "--from", addr(orthanc), "--json", "-k", "PatientID=NOBODY")
    assert res.returncode == 0 and json.loads(res.stdout) == []

    res = node.cli("query", "--from", addr(orthanc), "-k", "PatientNme=X")
    assert res.returncode == 2 and "not a DICOM keyword" in res.stderr


# --------------------------------------------------------------------------- pull


@pytest.mark.peers
@pytest.mark.parametrize("via", ["get", "move"])
def test_pull_imports_study_pixel_exact(pacs, tmp_path: Path, via: str) -> None:
    """Migrating a study from Orthanc: every instance lands in the node, pixel-exact."""
    node, orthanc = pacs
    study, files = study_files(tmp_path / "in")
    other, other_files = study_files(tmp_path / "other")  # must stay behind
    for f in [*files, *other_files]:
        orthanc.upload(f)
    res = node.cli(
        "pull", "--from", addr(orthanc), "--study", study, "--via", via, "--into", addr(node)
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 completed, 0 failed" in res.stdout, res.stdout
    wait_compressed(node, len(files))
    check_pixel_exact(node, study, files, tmp_path / "export")
    assert node.stats()["studies"] == 1


@pytest.mark.peers
def test_pull_default_into_is_this_node(pacs, tmp_path: Path) -> None:
    """Without --into, the study goes to the node of the config (AE title and port)."""
    node, orthanc = pacs
    study, files = study_files(tmp_path / "in")
    for f in files:
        orthanc.upload(f)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nae_title = "COMPACS"\nport = {node.port}\n')
    res = node.cli("pull", "--from", addr(orthanc), "--study", study, "--config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "C-MOVE to COMPACS" in res.stdout and "5 completed" in res.stdout
    wait_compressed(node, len(files))
    check_pixel_exact(node, study, files, tmp_path / "export")


@pytest.mark.peers
def test_pull_get_keeps_compressed_syntax(make_orthanc, make_storescp, tmp_path: Path) -> None:
    """C-GET proposes one context per syntax for the study's SOP classes, so Orthanc sends
    JPEG-LS and J2K objects as stored, and we forward them unchanged (storescp keeps
    what it receives)."""
    scp = make_storescp()
    orthanc = make_orthanc(modalities={"PULLER": ("127.0.0.1", scp.port)})
    study, files = study_files(tmp_path / "in")
    for f in files:
        orthanc.upload(f)
    res = compacs(
        "pull", "--from", addr(orthanc), "--study", study, "--via", "get",
        "--into", addr(scp), "--from-ae", "PULLER",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    received = {sop_uid(p): peers.transfer_syntax_of(p) for p in scp.received()}
    assert received == {sop_uid(f): peers.transfer_syntax_of(f) for f in files}
    assert {JPEG_LS, J2K, EXPLICIT_LE} == set(received.values())


# --------------------------------------------------------------------------- errors


@pytest.mark.peers
def test_pull_errors_are_clear(pacs, make_orthanc, tmp_path: Path) -> None:
    node, orthanc = pacs
    study, files = study_files(tmp_path / "in")
    orthanc.upload(files[0])

    res = node.cli("pull", "--from", addr(orthanc), "--study", "1.2.3.4.5", "--into", addr(node))
    assert res.returncode == 2
    assert "has no study with Study Instance UID 1.2.3.4.5" in res.stderr

    # a destination Orthanc does not know: 0xA801, and the message says what to do
    res = node.cli(
        "pull", "--from", addr(orthanc), "--study", study, "--into",
        f"STRANGER@127.0.0.1:{node.port}", "--from-ae", "COMPACS",
    )  # fmt: skip
    assert res.returncode == 2
    assert "refused the C-MOVE" in res.stderr, res.stderr
    assert "know the move destination 'STRANGER'" in res.stderr, res.stderr

    # a caller an Orthanc that checks callers does not know: it aborts, we say why it may
    strict = {f"DicomAlwaysAllow{s}": False for s in ("Find", "Get", "Move")}
    checking = make_orthanc(extra_config=strict)
    checking.upload(files[0])
    res = node.cli(
        "pull", "--from", addr(checking), "--study", study, "--into", addr(node),
        "--from-ae", "STRANGER",
    )  # fmt: skip
    assert res.returncode == 2
    assert "'STRANGER'" in res.stderr and "DicomModalities" in res.stderr, res.stderr

    # the destination is down
    res = node.cli(
        "pull", "--from", addr(orthanc), "--study", study,
        "--into", f"COMPACS@127.0.0.1:{peers.free_port()}",
    )  # fmt: skip
    assert res.returncode == 2 and "does not answer" in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1:4242", "no AE title"),
        ("ORTHANC127.0.0.1:4242", "no AE title"),
        ("@127.0.0.1:4242", "AE title before '@' is empty"),
        ("A_TITLE_OF_17_CHR@127.0.0.1:4242", "1 to 16 characters"),
        ("ORTHANC@127.0.0.1", "no port"),
        ("ORTHANC@127.0.0.1:port", "port must be a number"),
        ("ORTHANC@127.0.0.1:70000", "port must be a number from 1 to 65535"),
        ("ORTHANC@:4242", "host is empty"),
    ],
)
def test_bad_address_exit_2(address: str, words: str, tmp_path: Path) -> None:
    for args in (
        ["send", "--to", address, str(tmp_path)],
        ["query", "--from", address],
        ["pull", "--from", address, "--study", "1.2.3"],
    ):
        res = compacs(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert words in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.peers
def test_unreachable_peer_and_nothing_to_send(pacs, tmp_path: Path) -> None:
    node, _orthanc = pacs
    f = dicomdata.ct_series(tmp_path / "in", 1)[0]
    res = node.cli("send", "--to", f"X@127.0.0.1:{peers.free_port()}", str(f))
    assert res.returncode == 2 and "cannot reach X@127.0.0.1" in res.stderr, res.stderr
    (tmp_path / "empty" / "a.txt").parent.mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    res = node.cli("send", "--to", addr(node), str(tmp_path / "empty"))
    assert res.returncode == 2 and "no DICOM file to send" in res.stderr, res.stderr


# --------------------------------------------------------------------------- units


def test_parse_peer_accepts_ipv6_and_at_in_title() -> None:
    assert parse_peer("ORTHANC@127.0.0.1:4242") == Peer("ORTHANC", "127.0.0.1", 4242)
    assert parse_peer("PACS@[::1]:104") == Peer("PACS", "::1", 104)
    assert str(parse_peer("PACS@[::1]:104")) == "PACS@[::1]:104"
    assert parse_peer("A@B@host:1").ae_title == "A@B"
    with pytest.raises(AddressError):
        parse_peer("BAD\\AE@host:1")


def test_plan_associations_splits_at_128_contexts() -> None:
    """One context per syntax plus the native fallback, at most 128 per association, all
    contexts of a class together, files in their order."""
    files = [
        DicomFile(Path(f"{i}-{ts}"), UID(f"1.2.3.{i}"), f"9.{i}.{ts}", UID(ts))
        for i in range(70)  # 2 contexts each: 140
        for ts in (EXPLICIT_LE, JPEG_LS)
    ]
    plans = plan_associations(files)
    assert len(plans) == 2
    assert all(len(contexts) <= MAX_CONTEXTS for contexts, _ in plans)
    assert sum(len(group) for _, group in plans) == len(files)
    first, _ = plans[0]
    assert [cx.transfer_syntax for cx in first[:2]] == [[JPEG_LS], [EXPLICIT_LE, IMPLICIT_LE]]
    classes = [{cx.abstract_syntax for cx in contexts} for contexts, _ in plans]
    assert not classes[0] & classes[1]


def test_get_contexts_budget() -> None:
    """The study's classes get one context per syntax; the rest fill up to 128."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    contexts, roles = get_contexts([ct])
    assert len(contexts) == MAX_CONTEXTS
    ct_syntaxes = [cx.transfer_syntax for cx in contexts if cx.abstract_syntax == ct]
    assert [JPEG_LS] in ct_syntaxes and [J2K] in ct_syntaxes
    assert len({cx.abstract_syntax for cx in contexts[1:]}) == len(roles)
    many = [f"1.2.840.10008.5.1.4.1.1.{i}" for i in range(60)]
    contexts, _ = get_contexts(many)
    assert len(contexts) <= MAX_CONTEXTS
