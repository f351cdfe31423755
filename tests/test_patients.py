"""The patient model (schema.Patient, schema.Study): each study answers with its own patient
attributes, a PatientID whose studies disagree is flagged, objects without a PatientID never
merge, a replace changes its own study only; and UID keys, matched exactly through one
function in C-FIND and C-GET/C-MOVE, also in lists of 2,000.

Unit tests on an index filled through Index.add_received (SQLite and PostgreSQL), then the
same through a real node: storescu in, DCMTK findscu out, `compacs stats` and `verify`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dicomdata
import pydicom
import pytest
from nodecheck import store_all, wait_compressed
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from test_find import KEEP_AS_RECEIVED, findscu

from compacs.service import problems
from compacs.service.query import find
from compacs.service.retrieve import matching_instances
from compacs.service.storage.index import Index, NewBlob, PatientProblem
from compacs.service.storage.schema import Acknowledgement

# A UID with "*" is what the tests send on purpose: pydicom warns on setting it.
# (and partial dates, a lenient extension)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    index = Index.open(url, create=True)
    try:
        yield index
    finally:
        index.close()


def dataset(patient_id: str | None, name: str, study: str, **more: Any) -> Dataset:
    ds = Dataset()
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientName = name
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, more.pop("series", None) or generate_uid()
    ds.SOPInstanceUID = more.pop("sop", None) or generate_uid()
    ds.SOPClassUID, ds.Modality = CT_IMAGE, "CT"
    for keyword, value in more.items():
        setattr(ds, keyword, value)
    return ds


def add(index: Index, ds: Dataset) -> Dataset:
    index.add_received(
        ds,
        NewBlob(f"x/{ds.SOPInstanceUID}.dcm", 10, "0"),
        None,
        None,
        received_transfer_syntax=EXPLICIT_LE,
        received_size=10,
        stored_transfer_syntax=EXPLICIT_LE,
        stored_size=10,
    )
    return ds


def query(index: Index, level: str, model: str = "study", **keys: Any) -> list[Dataset]:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return list(find(index, ds, model))


def names_by_study(index: Index, **keys: Any) -> dict[str, str]:
    answers = query(index, "STUDY", **{"StudyInstanceUID": "", "PatientName": "", **keys})
    return {a.StudyInstanceUID: str(a.PatientName) for a in answers}


# --------------------------------------------------------------------------- unit


def test_each_study_answers_its_own_patient_and_the_id_is_flagged(index: Index) -> None:
    roe, doe, other = generate_uid(), generate_uid(), generate_uid()
    add(index, dataset("0", "ROE^RICHARD", roe, PatientBirthDate="19500101", PatientSex="M"))
    add(index, dataset("0", "DOE^JANE", doe, PatientBirthDate="19800202", PatientSex="F"))
    add(index, dataset("0", "DOE^JANE^^", doe))  # a second object of the study: no new row
    add(index, dataset("P7", "SMITH^ANN", other, OtherPatientIDs=["A1", "B2"]))
    assert names_by_study(index) == {roe: "ROE^RICHARD", doe: "DOE^JANE", other: "SMITH^ANN"}
    assert list(names_by_study(index, PatientName="DOE*")) == [doe]
    assert list(names_by_study(index, PatientName="roe^richard")) == [roe]
    (d,) = query(
        index, "STUDY", StudyInstanceUID=doe, PatientBirthDate="", PatientSex="", PatientID=""
    )
    assert (d.PatientID, d.PatientBirthDate, d.PatientSex) == ("0", "19800202", "F")
    assert list(names_by_study(index, PatientBirthDate="1950")) == [roe]
    (s,) = query(index, "STUDY", StudyInstanceUID=other, OtherPatientIDs="")
    assert list(s.OtherPatientIDs) == ["A1", "B2"]
    assert list(names_by_study(index, OtherPatientIDs="B2")) == [other]
    assert list(names_by_study(index, OtherPatientIDs="A?")) == [other]
    assert list(names_by_study(index, OtherPatientIDs="A")) == []

    # PATIENT level: one answer per name under the PatientID, each with its own studies
    patients = query(
        index,
        "PATIENT",
        "patient",
        PatientID="0",
        PatientName="",
        PatientBirthDate="",
        NumberOfPatientRelatedStudies="",
    )
    got = sorted(
        (str(p.PatientName), p.PatientBirthDate, p.NumberOfPatientRelatedStudies) for p in patients
    )
    assert got == [("DOE^JANE", "19800202", 1), ("ROE^RICHARD", "19500101", 1)]
    (p,) = query(index, "PATIENT", "patient", PatientID="", PatientName="DOE*")
    assert p.PatientID == "0"
    # Patient Root below PATIENT: the PatientID names both studies
    found = query(index, "STUDY", "patient", PatientID="0", StudyInstanceUID="")
    assert sorted(a.StudyInstanceUID for a in found) == sorted([roe, doe])

    assert index.stats()["patient_id_conflicts"] == 1
    conflicts = index.patient_conflicts()
    assert sorted((c.patient_id, c.patient_name, c.a_study) for c in conflicts) == [
        ("0", "DOE^JANE", doe),
        ("0", "ROE^RICHARD", roe),
    ]


def test_the_issuer_separates_patient_ids(index: Index) -> None:
    a, b = generate_uid(), generate_uid()
    add(index, dataset("123", "ROE^RICHARD", a, IssuerOfPatientID="HOSP_A"))
    add(index, dataset("123", "DOE^JANE", b, IssuerOfPatientID="HOSP_B"))
    assert index.stats()["patient_id_conflicts"] == 0
    patients = query(index, "PATIENT", "patient", PatientID="123", IssuerOfPatientID="HOSP_B")
    assert [p.IssuerOfPatientID for p in patients] == ["HOSP_B"]
    (s,) = query(index, "STUDY", StudyInstanceUID=a, IssuerOfPatientID="")
    assert s.IssuerOfPatientID == "HOSP_A"


def test_objects_without_a_patient_id_never_merge(index: Index) -> None:
    absent, empty, again = generate_uid(), generate_uid(), generate_uid()
    add(index, dataset(None, "ANON^ONE", absent))
    add(index, dataset("", "ANON^TWO", empty))
    add(index, dataset("", "ANON^TWO", again))  # the same name: still another study's patient
    assert names_by_study(index) == {absent: "ANON^ONE", empty: "ANON^TWO", again: "ANON^TWO"}
    patients = query(
        index, "PATIENT", "patient", PatientID="", PatientName="", NumberOfPatientRelatedStudies=""
    )
    assert sorted((str(p.PatientName), p.NumberOfPatientRelatedStudies) for p in patients) == [
        ("ANON^ONE", 1),
        ("ANON^TWO", 1),
        ("ANON^TWO", 1),
    ]
    assert index.stats()["patient_id_conflicts"] == 0


def test_replace_changes_its_own_study_only(index: Index) -> None:
    a, b = generate_uid(), generate_uid()
    first = add(index, dataset("P1", "ROE^RICHARD", a))
    add(index, dataset("P1", "ROE^RICHARD", b))
    assert index.stats()["patient_id_conflicts"] == 0
    corrected = dataset(
        "P1", "DOE^JANE", a, series=first.SeriesInstanceUID, sop=first.SOPInstanceUID
    )
    held = index.received_version(first.SOPInstanceUID)
    assert held is not None
    blob = NewBlob(f"x/{first.SOPInstanceUID}-2.dcm", 10, "1")
    assert index.replace_received(corrected, held, blob, None, None, received_size=10)
    assert names_by_study(index) == {a: "DOE^JANE", b: "ROE^RICHARD"}
    assert index.stats()["patient_id_conflicts"] == 1
    # corrected back: the DOE row is left by its only study and goes; no conflict remains
    again = dataset(
        "P1", "ROE^RICHARD", a, series=first.SeriesInstanceUID, sop=first.SOPInstanceUID
    )
    held = index.received_version(first.SOPInstanceUID)
    assert held is not None
    blob = NewBlob(f"x/{first.SOPInstanceUID}-3.dcm", 10, "2")
    assert index.replace_received(again, held, blob, None, None, received_size=10)
    assert index.stats()["patient_id_conflicts"] == 0
    patients = query(index, "PATIENT", "patient", PatientID="P1", PatientName="")
    assert [str(p.PatientName) for p in patients] == ["ROE^RICHARD"]


def test_a_patient_id_conflict_is_acknowledged_until_another_name_comes(index: Index) -> None:
    """`compacs problems ack --patient` in the index: one problem per PatientID (+ issuer),
    acknowledged as its names read; a new study of a known name keeps the acknowledgement,
    a new name ends it. A PatientID and issuer of 64 characters each fit (PostgreSQL checks
    the subject column's length)."""
    roe, doe = generate_uid(), generate_uid()
    add(index, dataset("0", "ROE^RICHARD", roe, PatientBirthDate="19500101"))
    add(index, dataset("0", "DOE^JANE", doe, PatientBirthDate="19800202"))
    for issuer in ("HOSP_A", "HOSP_B"):  # one PatientID, two patient domains, a conflict in each
        for name in ("ANN", "BOB"):
            add(index, dataset("7", name, generate_uid(), IssuerOfPatientID=issuer))
    long_id, long_issuer = "9" * 64, "I" * 64
    for name in ("LONG^ONE", "LONG^TWO"):
        add(index, dataset(long_id, name, generate_uid(), IssuerOfPatientID=long_issuer))

    def conflicts() -> dict[tuple[str, str | None], PatientProblem]:
        return {(c.patient_id, c.issuer_of_patient_id): c for c in index.patient_problems()}

    found = conflicts()
    assert sorted(found) == [("0", None), ("7", "HOSP_A"), ("7", "HOSP_B"), (long_id, long_issuer)]
    assert all(c.acknowledged is None for c in found.values())
    assert found[("0", None)].reason == (
        f"2 patients under one PatientID: 'DOE^JANE' born 19800202, 1 study (e.g. {doe}); "
        f"'ROE^RICHARD' born 19500101, 1 study (e.g. {roe})"
    )

    with pytest.raises(problems.SelectionError, match="give SOP Instance UIDs, --study UID, --pa"):
        problems.acknowledge(index, [], [], False, "me", None)
    with pytest.raises(problems.SelectionError, match="no patient-ID conflict under PatientID '1'"):
        problems.acknowledge(index, [], [], False, "me", None, ["1"])
    with pytest.raises(problems.SelectionError, match=r"several issuers \('HOSP_A', 'HOSP_B'\)"):
        problems.acknowledge(index, [], [], False, "me", None, ["7"])
    with pytest.raises(problems.SelectionError, match="'7' with issuer 'HOSP_C'"):
        problems.acknowledge(index, [], [], False, "me", None, ["7"], "HOSP_C")
    with pytest.raises(problems.SelectionError, match="'7' without an issuer"):
        problems.acknowledge(index, [], [], False, "me", None, ["7"], "")
    with pytest.raises(problems.SelectionError, match="give --patient too"):
        problems.acknowledge(index, [], [], False, "me", None, [], "HOSP_A")
    assert index.problems() == []  # no object is flagged: an instance selection is an error
    with pytest.raises(problems.SelectionError, match="no flagged or parked object"):
        problems.acknowledge(index, ["1.2.3"], [], False, "me", None, ["0"])
    assert all(c.acknowledged is None for c in conflicts().values())  # nothing half-done

    acked = problems.acknowledge(index, [], [], False, "dr admin", "two people", ["0"], "")
    assert acked == [found[("0", None)]]
    acked = problems.acknowledge(index, [], [], False, "dr admin", None, ["7"], "HOSP_B")
    assert acked == [found[("7", "HOSP_B")]]
    found = conflicts()
    ack = found[("0", None)].acknowledged
    assert ack is not None and (ack.by, ack.note) == ("dr admin", "two people")
    assert found[("7", "HOSP_B")].acknowledged is not None
    assert found[("7", "HOSP_A")].acknowledged is None  # the other domain is not passed
    detail = index.last_audit("acknowledged")
    assert detail is not None and "by dr admin: PatientID '7' (issuer 'HOSP_B'): 2 pat" in detail

    # another study of a known name (its name padded as PS3.5 allows): still acknowledged
    add(index, dataset("0", "DOE^JANE^^", generate_uid(), PatientBirthDate="19800202"))
    (name,) = [c for c in conflicts()[("0", None)].names if c.a_study != roe]
    assert name.studies == 2
    assert conflicts()[("0", None)].acknowledged is not None
    # a third name: a new problem, to be looked at and acknowledged again
    add(index, dataset("0", "POE^EDGAR", generate_uid()))
    again = conflicts()[("0", None)]
    assert again.acknowledged is None and again.reason.startswith("3 patients under one")
    assert "'POE^EDGAR' born (none), 1 study" in again.reason

    acked = problems.acknowledge(index, [], [], True, "cron owner", None)  # --all
    assert len(acked) == 4
    assert all(c.acknowledged is not None for c in conflicts().values())
    with index.reading() as s:  # one acknowledgement in force per PatientID (+ issuer)
        kinds = s.execute(select(Acknowledgement.kind, func.count()).group_by(Acknowledgement.kind))
        assert dict(kinds.all()) == {"patient": 4}


def test_uid_lists_of_2000_and_no_wildcards_in_find_and_retrieve(index: Index) -> None:
    study = generate_uid()
    series = generate_uid()
    stored = [add(index, dataset("P1", "ROE^RICHARD", study, series=series)) for _ in range(3)]
    rng = random.Random(20)
    noise = [f"2.25.{rng.getrandbits(100)}" for _ in range(2000)]
    sops = [stored[0].SOPInstanceUID, stored[2].SOPInstanceUID]
    for level, keyword, wanted in (
        ("STUDY", "StudyInstanceUID", [study]),
        ("SERIES", "SeriesInstanceUID", [series]),
        ("IMAGE", "SOPInstanceUID", sops),
    ):
        uids = noise[:1000] + wanted + noise[1000:]
        answers = query(index, level, **{keyword: uids})
        assert sorted(getattr(a, keyword) for a in answers) == sorted(wanted), level
        # the same list names the same instances for a C-GET/C-MOVE
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        setattr(identifier, keyword, uids)
        got = {i.sop_instance_uid for i in matching_instances(index, identifier)}
        assert got == ({s.SOPInstanceUID for s in stored} if level != "IMAGE" else set(sops))

    # "*" and "?" are no wildcards on a UID: nothing matches, in C-FIND as in C-GET
    for value in ("*", study[:-1] + "?", study[:10] + "*"):
        assert query(index, "STUDY", StudyInstanceUID=value) == [], value
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = value
        assert matching_instances(index, identifier) == [], value
    # an empty UID key is still universal matching in C-FIND
    assert [a.StudyInstanceUID for a in query(index, "STUDY", StudyInstanceUID="")] == [study]


# --------------------------------------------------------------------------- node + DCMTK


def _study(out: Path, patient_id: str | None, name: str, n: int = 1, **more: Any) -> list[Path]:
    overrides: dict[str, Any] = {"PatientName": name, **more}
    files = dicomdata.ct_series(out, n, generate_uid(), prefix=name.split("^")[0], **overrides)
    for f in files:  # the template has a PatientID: set or remove it as asked
        ds = pydicom.dcmread(f)
        if patient_id is None:
            del ds.PatientID
        else:
            ds.PatientID = patient_id
        ds.save_as(f)
    return files


@pytest.mark.peers
def test_colliding_patient_ids_over_dimse(make_node: Any, tmp_path: Path) -> None:
    """The issue's case: ROE^RICHARD, then DOE^JANE under one PatientID, stored with
    storescu and asked with findscu in both models; plus objects without a PatientID."""
    node = make_node(KEEP_AS_RECEIVED)
    roe = _study(tmp_path / "roe", "0123", "ROE^RICHARD", 2)
    doe = _study(tmp_path / "doe", "0123", "DOE^JANE", 1)
    anon_a = _study(tmp_path / "anon", None, "ANON^A")
    anon_b = _study(tmp_path / "anon", "", "ANON^B")
    for files in (roe, doe, anon_a, anon_b):
        store_all(node, files)
    uid = {
        key: pydicom.dcmread(files[0]).StudyInstanceUID
        for key, files in (("roe", roe), ("doe", doe), ("a", anon_a), ("b", anon_b))
    }
    out = tmp_path / "rsp"

    answers = findscu(node, "study", "STUDY", {"StudyInstanceUID": "", "PatientName": ""}, out)
    by_study = {a.StudyInstanceUID: str(a.PatientName) for a in answers}
    assert by_study == {
        uid["roe"]: "ROE^RICHARD",
        uid["doe"]: "DOE^JANE",
        uid["a"]: "ANON^A",
        uid["b"]: "ANON^B",
    }
    keys = {"StudyInstanceUID": "", "PatientName": "DOE*"}
    assert [a.StudyInstanceUID for a in findscu(node, "study", "STUDY", keys, out)] == [uid["doe"]]

    keys = {"PatientID": "0123", "PatientName": "", "NumberOfPatientRelatedStudies": ""}
    patients = findscu(node, "patient", "PATIENT", keys, out)
    got = sorted((str(p.PatientName), int(p.NumberOfPatientRelatedStudies)) for p in patients)
    assert got == [("DOE^JANE", 1), ("ROE^RICHARD", 1)]
    keys = {"PatientID": "", "PatientName": "ANON*", "NumberOfPatientRelatedStudies": ""}
    anon = findscu(node, "patient", "PATIENT", keys, out)
    assert sorted(str(p.PatientName) for p in anon) == ["ANON^A", "ANON^B"]
    keys = {"PatientID": "0123", "StudyInstanceUID": "", "PatientName": ""}
    studies = findscu(node, "patient", "STUDY", keys, out)
    assert {a.StudyInstanceUID: str(a.PatientName) for a in studies} == {
        uid["roe"]: "ROE^RICHARD",
        uid["doe"]: "DOE^JANE",
    }

    stats = node.stats()
    assert stats["patient_id_conflicts"] == 1
    res = node.cli("stats", "--data", str(node.data_dir))
    assert "patient_id_conflict 1" in res.stdout, res.stdout
    res = node.verify()
    assert res.returncode == 1
    listed = [line for line in res.stdout.splitlines() if "patient_id_conflict" in line]
    assert len(listed) == 2, res.stdout
    assert any("ROE^RICHARD" in line and uid["roe"] in line for line in listed), listed
    assert any("DOE^JANE" in line and uid["doe"] in line for line in listed), listed


@pytest.mark.peers
def test_a_patient_id_conflict_is_listed_acknowledged_and_passes_verify(
    make_node: Any, tmp_path: Path
) -> None:
    """`compacs problems` lists a PatientID whose studies disagree (text and --json);
    `problems ack --patient` lets `verify` exit 0 (a cron health check); a third name stored
    with storescu makes it fail again; `problems ack --all` takes conflicts too."""
    node = make_node(KEEP_AS_RECEIVED)
    data = ["--data", str(node.data_dir)]
    roe = _study(tmp_path / "roe", "0123", "ROE^RICHARD", 2)
    doe = _study(tmp_path / "doe", "0123", "DOE^JANE", PatientBirthDate="19800202")
    for files in (roe, doe):
        store_all(node, files)
    uid = {k: pydicom.dcmread(f[0]).StudyInstanceUID for k, f in (("roe", roe), ("doe", doe))}
    roe_born = pydicom.dcmread(roe[0]).get("PatientBirthDate") or "(none)"

    res = node.cli("problems", *data)
    assert res.returncode == 0, res.stderr
    (line,) = [line for line in res.stdout.splitlines() if line.startswith("0123 ")]
    assert f"'DOE^JANE' born 19800202, 1 study (e.g. {uid['doe']})" in line, line
    assert f"'ROE^RICHARD' born {roe_born}, 1 study (e.g. {uid['roe']})" in line, line
    assert "1 problem(s): 0 parked, 0 flagged, 1 patient-ID conflict(s), 0 acknowledged" in (
        res.stdout
    )
    assert node.verify().returncode == 1

    bad = node.cli("problems", "ack", *data, "--patient", "0124")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.strip() == (
        "compacs: problems ack: no patient-ID conflict under PatientID '0124'; "
        "`compacs problems` lists those there are"
    )
    ack = node.cli(
        "problems", "ack", *data, "--patient", "0123", "--by", "dr admin", "--note", "two people"
    )
    assert ack.returncode == 0, ack.stderr
    assert "acknowledged PatientID '0123': 2 patients under one PatientID" in ack.stdout
    listed = json.loads(node.cli("problems", *data, "--json").stdout)
    assert listed["objects"] == []
    (conflict,) = listed["patient_id_conflicts"]
    assert (conflict["patient_id"], conflict["issuer_of_patient_id"]) == ("0123", None)
    names = sorted((p["patient_name"], p["studies"], p["a_study"]) for p in conflict["patients"])
    assert names == [("DOE^JANE", 1, uid["doe"]), ("ROE^RICHARD", 1, uid["roe"])]
    assert conflict["acknowledged"]["by"] == "dr admin"
    assert conflict["acknowledged"]["note"] == "two people"
    verify = node.verify()
    assert verify.returncode == 0, verify.stdout
    assert "0 problem(s), 1 acknowledged" in verify.stdout
    assert "patient_id_conflict" not in verify.stdout
    assert node.stats()["patient_id_conflicts"] == 1  # acknowledged, still there

    poe = _study(tmp_path / "poe", "0123", "POE^EDGAR")
    store_all(node, poe)
    verify = node.verify()
    assert verify.returncode == 1, verify.stdout
    listed = [line for line in verify.stdout.splitlines() if "patient_id_conflict" in line]
    assert len(listed) == 3 and any("POE^EDGAR" in line for line in listed), verify.stdout
    (conflict,) = json.loads(node.cli("problems", *data, "--json").stdout)["patient_id_conflicts"]
    assert conflict["acknowledged"] is None and len(conflict["patients"]) == 3
    ack = node.cli("problems", "ack", *data, "--all")
    assert ack.returncode == 0, ack.stderr
    assert "1 problem(s) acknowledged" in ack.stdout
    assert node.verify().returncode == 0


@pytest.mark.peers
def test_replace_re_send_changes_its_own_study_only(make_node: Any, tmp_path: Path) -> None:
    node = make_node(KEEP_AS_RECEIVED + '[node]\non_duplicate = "replace"\n')
    first = _study(tmp_path / "a", "P1", "ROE^RICHARD")
    second = _study(tmp_path / "b", "P1", "ROE^RICHARD")
    store_all(node, first + second)
    ds = pydicom.dcmread(first[0])
    ds.PatientName = "DOE^JANE"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected)
    store_all(node, [corrected])
    wait_compressed(node, 2)
    out = tmp_path / "rsp"
    answers = findscu(node, "study", "STUDY", {"StudyInstanceUID": "", "PatientName": ""}, out)
    assert {a.StudyInstanceUID: str(a.PatientName) for a in answers} == {
        ds.StudyInstanceUID: "DOE^JANE",
        pydicom.dcmread(second[0]).StudyInstanceUID: "ROE^RICHARD",
    }


@pytest.mark.peers
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_findscu_with_2000_uids(
    make_node: Any, tmp_path: Path, request: pytest.FixtureRequest, database: str
) -> None:
    """Lists of 2,000 UIDs at STUDY, SERIES and IMAGE level (short UIDs: one findscu
    argument holds at most 128 KiB), and a UID key of "*" matching nothing."""
    env = {"COMPACS_INDEX_URL": request.getfixturevalue("pg_url")} if database != "sqlite" else {}
    node = make_node(KEEP_AS_RECEIVED, env=env)
    files = dicomdata.ct_series(tmp_path / "in", 3, PatientID="P1")
    store_all(node, files)
    stored = [pydicom.dcmread(f) for f in files]
    rng = random.Random(2000)
    noise = [f"2.25.{rng.getrandbits(64)}" for _ in range(2000)]
    out = tmp_path / "rsp"
    for level, keyword, wanted in (
        ("STUDY", "StudyInstanceUID", [stored[0].StudyInstanceUID]),
        ("SERIES", "SeriesInstanceUID", [stored[0].SeriesInstanceUID]),
        ("IMAGE", "SOPInstanceUID", [stored[0].SOPInstanceUID, stored[2].SOPInstanceUID]),
    ):
        uids = "\\".join(noise[:1000] + wanted + noise[1000:])
        answers = findscu(node, "study", level, {keyword: uids}, out)
        assert sorted(getattr(a, keyword) for a in answers) == sorted(wanted), level
    assert findscu(node, "study", "STUDY", {"StudyInstanceUID": "*"}, out) == []
    everything = findscu(node, "study", "STUDY", {"StudyInstanceUID": ""}, out)
    assert [a.StudyInstanceUID for a in everything] == [stored[0].StudyInstanceUID]
    assert "Traceback" not in node.log_text()


def test_two_processes_adding_names_under_one_patient_id_at_once_flag_the_conflict(
    pg_url: str,
) -> None:
    """Two serve processes on one PostgreSQL index: each adds a new name under PatientID 0042
    in its own transaction. Without a lock each counts only its own uncommitted row and the
    conflict goes unflagged; the per-PatientID advisory lock makes the second count wait for
    the first commit. B starts while A holds its transaction open (A waits before commit)."""
    import threading
    import time

    from compacs.service.storage.index import patients as index_mod

    a, b = Index.open(pg_url, create=True), Index.open(pg_url, create=True)
    a_inserted = threading.Event()

    def add_name(idx: Index, name: str, study: str, hold: bool) -> None:
        ds = dataset("0042", name, study)
        with idx.engine.begin() as conn:
            index_mod._patient_for(conn, index_mod._patient_values(ds), study)
            if hold:
                a_inserted.set()
                time.sleep(1.5)  # B's insert and count happen now, before A commits

    try:
        first = threading.Thread(target=add_name, args=(a, "ROE^RICHARD", generate_uid(), True))
        first.start()
        assert a_inserted.wait(30)
        add_name(b, "DOE^JANE", generate_uid(), False)
        first.join()
        with a.engine.connect() as conn:
            flags = conn.execute(
                select(index_mod._PATIENT.c.patient_id_conflict).where(
                    index_mod._PATIENT.c.patient_id == "0042"
                )
            ).scalars().all()
        assert flags == [True, True]
    finally:
        a.close()
        b.close()
