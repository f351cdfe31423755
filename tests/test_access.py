"""[access]: closed by default. C-ECHO and C-STORE are open to every caller; C-FIND, C-GET
and C-MOVE only to the AE titles listed and to callers on the node's own host; a refused
request gets 0x0124 (Refused: Not Authorized) and a log line naming AE, address, service.

A remote caller is played by a pynetdicom SCU bound to 127.0.0.3: the node counts only
127.0.0.1, ::1 and the address a connection reached it at as its own host
(dimse/authorisation.is_local).
"""

from __future__ import annotations

import socket
from pathlib import Path

import dicomdata
import peers
import pydicom
import pytest
import rawfind
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from compacs.service.config import ConfigError, load_config

REMOTE = "127.0.0.3"  # not the node's host, as far as [access] is concerned
NOT_AUTHORISED = 0x0124
VERIFICATION = "1.2.840.10008.1.1"


def _scu(calling: str) -> AE:
    ae = AE(ae_title=calling)
    for context in (
        Verification,
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    ):
        ae.add_requested_context(context)
    return ae


class Peer:
    """One association from `bind` as `calling`, with the statuses of what it asked."""

    def __init__(self, node: peers.CompacsProcess, calling: str, bind: str = REMOTE) -> None:
        ae = _scu(calling)
        self.received: list[str] = []

        def on_store(event) -> int:  # noqa: ANN001 - pynetdicom's event
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        self.assoc = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            bind_address=(bind, 0),
            ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert self.assoc.is_established, f"{calling} from {bind}: not associated"

    def echo(self) -> int:
        return self.assoc.send_c_echo().Status

    def store(self, path: Path) -> int:
        return self.assoc.send_c_store(pydicom.dcmread(path)).Status

    def find(self, study_uid: str = "") -> tuple[list[int], list[str]]:
        """Statuses of every response, Error Comments of the final one."""
        statuses, comments = [], []
        for status, _identifier in self.assoc.send_c_find(
            _study(study_uid), StudyRootQueryRetrieveInformationModelFind
        ):
            statuses.append(status.Status)
            if "ErrorComment" in status:
                comments.append(status.ErrorComment)
        return statuses, comments

    def get(self, study_uid: str) -> tuple[list[int], list[str]]:
        statuses, comments = [], []
        for status, _identifier in self.assoc.send_c_get(
            _study(study_uid), StudyRootQueryRetrieveInformationModelGet
        ):
            statuses.append(status.Status)
            if "ErrorComment" in status:
                comments.append(status.ErrorComment)
        return statuses, comments

    def move(self, study_uid: str, destination: str) -> list[int]:
        return [
            status.Status
            for status, _identifier in self.assoc.send_c_move(
                _study(study_uid), destination, StudyRootQueryRetrieveInformationModelMove
            )
            if status
        ]

    def release(self) -> None:
        self.assoc.release()


def _study(study_uid: str) -> pydicom.Dataset:
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _one_study(node: peers.CompacsProcess, tmp_path: Path) -> tuple[list[Path], str]:
    files = dicomdata.ct_series(tmp_path / "ct", 2)
    assert peers.store_ok(node.store(files), files)
    return files, pydicom.dcmread(files[0]).StudyInstanceUID


def test_by_default_a_remote_caller_may_store_and_echo_but_not_query_or_retrieve(
    make_node, make_storescp, tmp_path: Path
) -> None:
    dest = make_storescp()
    node = make_node(f'[move_destinations]\nDEST = "127.0.0.1:{dest.port}"\n')
    files, study = _one_study(node, tmp_path)  # storescu from 127.0.0.1: this host
    log = node.log_text()
    assert (
        "access: store: any caller; query: nobody listed; retrieve: nobody listed; "
        "callers on this host: every service" in log
    )
    assert "with no [access] table" not in log  # it listens on loopback only

    remote = Peer(node, "VIEWER")
    try:
        assert remote.echo() == 0x0000
        more = dicomdata.ct_series(tmp_path / "more", 1, study_uid=study)
        assert remote.store(more[0]) == 0x0000
        statuses, comments = remote.find(study)
        assert statuses == [NOT_AUTHORISED], [hex(s) for s in statuses]
        assert comments and "[access] query" in comments[0]
        statuses, comments = remote.get(study)
        assert statuses == [NOT_AUTHORISED], [hex(s) for s in statuses]
        assert comments and "[access] retrieve" in comments[0]
        assert not remote.received
        assert remote.move(study, "DEST") == [NOT_AUTHORISED]
        assert not dest.received()
    finally:
        remote.release()
    log = node.log_text()
    assert f"refused query (C-FIND) for VIEWER from {REMOTE}: not listed in [access] query" in log
    assert (
        f"refused retrieve (C-GET/C-MOVE) for VIEWER from {REMOTE}: "
        "not listed in [access] retrieve" in log
    )
    assert log.count(f"refused retrieve (C-GET/C-MOVE) for VIEWER from {REMOTE}") == 2

    # the same requests from the node's own host are answered (a first local try works)
    res = peers.findscu(node.port, "STUDY", {"StudyInstanceUID": study}, aet="VIEWER")
    assert "Received Final Find Response (Success)" in res.stdout, res.stdout[-2000:]
    assert res.stdout.count("Find Response: 1 (Pending)") == 1, res.stdout[-2000:]
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, tmp_path / "g")
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    assert len(list((tmp_path / "g").iterdir())) == len(files) + 1


def test_a_listed_remote_ae_is_served_from_its_listed_host(make_node, tmp_path) -> None:
    node = make_node('[access]\nquery = ["VIEWER"]\nretrieve = ["VIEWER@127.0.0.3", "PACS"]\n')
    files, study = _one_study(node, tmp_path)
    viewer = Peer(node, "VIEWER")
    try:
        statuses, _ = viewer.find(study)
        assert statuses == [0xFF00, 0x0000], [hex(s) for s in statuses]
        statuses, _ = viewer.get(study)
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
        assert sorted(viewer.received) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    finally:
        viewer.release()
    elsewhere = Peer(node, "VIEWER", bind="127.0.0.4")  # listed for retrieve from .3 only
    try:
        statuses, _ = elsewhere.find(study)
        assert statuses[-1] == 0x0000
        statuses, _ = elsewhere.get(study)
        assert statuses == [NOT_AUTHORISED], [hex(s) for s in statuses]
    finally:
        elsewhere.release()
    pacs = Peer(node, "PACS")  # may retrieve from anywhere, may not query
    try:
        assert pacs.find(study)[0] == [NOT_AUTHORISED]
        statuses, _ = pacs.get(study)
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    finally:
        pacs.release()
    assert "refused retrieve (C-GET/C-MOVE) for VIEWER from 127.0.0.4" in node.log_text()


def test_local_callers_can_be_refused_too(make_node, tmp_path) -> None:
    """`local_callers = false`: DCMTK's findscu on this host is refused with the status."""
    node = make_node('[access]\nlocal_callers = false\nquery = ["VIEWER"]\n')
    _files, study = _one_study(node, tmp_path)
    res = peers.findscu(node.port, "STUDY", {"StudyInstanceUID": study}, aet="NOSY")
    final = res.stdout.split("Received Final Find Response")[-1].splitlines()[0]
    assert "0x0124" in final or "0x124" in final, res.stdout[-2000:]
    res = peers.findscu(node.port, "STUDY", {"StudyInstanceUID": study}, aet="VIEWER")
    assert "Received Final Find Response (Success)" in res.stdout
    assert "refused query (C-FIND) for NOSY from 127.0.0.1" in node.log_text()


def test_a_store_list_restricts_store_and_rejects_callers_allowed_nothing(
    make_node, tmp_path
) -> None:
    node = make_node('[access]\nlocal_callers = false\nstore = ["MODALITY"]\nquery = ["VIEWER"]\n')
    files = dicomdata.ct_series(tmp_path / "ct", 1)
    res = node.store(files, aet="INTRUDER")  # allowed nothing: A-ASSOCIATE-RJ
    assert "Association Rejected" in res.stdout, res.stdout[-2000:]
    assert not peers.store_ok(res, files)
    res = node.store(files, aet="VIEWER")  # may query, not store
    assert "Store Response (Unknown Status: 0x124)" in res.stdout, res.stdout[-2000:]
    assert peers.store_ok(node.store(files, aet="MODALITY"), files)
    log = node.log_text()
    assert "association rejected: calling AE INTRUDER from 127.0.0.1" in log
    assert "allowed no service in [access]" in log
    assert "refused store (C-STORE) for VIEWER from 127.0.0.1" in log


def test_listening_beyond_loopback_without_access_warns(make_node) -> None:
    node = make_node(start=False)
    node.host = "0.0.0.0"
    node.start()
    assert node.echo().returncode == 0
    line = next(ln for ln in node.log_text().splitlines() if "with no [access] table" in ln)
    assert " WARNING " in line and "listening on 0.0.0.0" in line
    assert "refused (0x0124) to every caller not on this host" in line


def _request(node: peers.CompacsProcess, called: bytes) -> tuple[int, bytes]:
    sock = socket.create_connection((node.host, node.port), timeout=60)
    try:
        pdu = rawfind.association_request(node.ae_title, b"ECHOSCU", VERIFICATION)
        sock.sendall(pdu[:10] + called.ljust(16) + pdu[26:])
        return rawfind.read_pdu(sock)
    finally:
        sock.close()


def test_check_called_ae(make_node) -> None:
    node = make_node("[node]\ncheck_called_ae = true\n")
    pdu_type, body = _request(node, b"SOMEONE_ELSE")
    assert pdu_type == 0x03, pdu_type  # A-ASSOCIATE-RJ
    assert tuple(body[1:4]) == (0x01, 0x01, 0x07), body[:4]  # called AE not recognised
    assert _request(node, b"  COMPACS")[0] == 0x02  # leading spaces are not significant
    assert "called AE title SOMEONE_ELSE is not this node's COMPACS" in node.log_text()
    default = make_node()  # off by default: any called AE title is answered
    assert _request(default, b"SOMEONE_ELSE")[0] == 0x02


def test_access_and_node_keys_are_checked_on_load(tmp_path: Path) -> None:
    """A mistake names the file, the table, the key and what is allowed."""
    cases = {
        '[access]\nlocal_callers = "yes"\n': "[access] local_callers: must be true or false",
        '[access]\nquer = ["VIEWER"]\n': "allowed keys: store, query, retrieve, local_callers",
        '[access]\nquery = ["BAD\\tAE"]\n': "[access] query: AE title must be printable ASCII",
        "[node]\nshutdown_grace_seconds = -1\n": "shutdown_grace_seconds: must be a number from 0",
        "[node]\ncheck_called_ae = 1\n": "[node] check_called_ae: must be true or false",
    }
    for text, expected in cases.items():
        path = tmp_path / "compacs.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert str(exc.value).startswith(str(path)) and expected in str(exc.value), exc.value
    path.write_text("[access]\nlocal_callers = false\n")
    access = load_config(path).access
    assert not access.local_callers and not access.allows("query", "X", "127.0.0.1", True)
    assert access.allows("store", "X", "10.1.2.3", False)
