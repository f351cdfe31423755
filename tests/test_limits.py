"""No lockout, bounded resources: [limits], the calling AE checks, and one log line (never a
traceback) for peers that misbehave on the wire.

The misbehaving peers here are bare sockets (tests/rawfind.py builds the PDUs), because
pynetdicom's own SCU would refuse to send what they send.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import dicomdata
import peers
import psutil
import pydicom
import pytest
import rawfind
from nodecheck import exported_by_sop, wait_compressed
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

VERIFICATION = "1.2.840.10008.1.1"


def _connect(node: peers.CompacsProcess) -> socket.socket:
    sock = socket.create_connection((node.host, node.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _associate_raw(node: peers.CompacsProcess, calling: bytes = b"RAWSCU") -> socket.socket:
    sock = _connect(node)
    sock.sendall(rawfind.association_request(node.ae_title, calling, VERIFICATION))
    pdu_type, _body = rawfind.read_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted: PDU type 0x{pdu_type:02X}"
    return sock


def _closed_by_node(sock: socket.socket, within: float = 60) -> bytes:
    """What the node sent until it closed the connection (an A-ABORT PDU, or nothing)."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _rss_mb(node: peers.CompacsProcess) -> float:
    return psutil.Process(node.pid).memory_info().rss / 1e6


def test_idle_and_closed_connections_lock_nobody_out(make_node, tmp_path: Path) -> None:
    """64 connections that open and close, and 62 that stay idle, while a storescu of 20
    instances and an echoscu still succeed, within the association timeout."""
    node = make_node()
    for _ in range(64):
        _connect(node).close()
    idle = [_connect(node) for _ in range(62)]
    try:
        files = dicomdata.ct_series(tmp_path / "ct", 20)
        res = node.store(files)
        assert peers.store_ok(res, files), res.stdout[-3000:]
        assert node.echo().returncode == 0
    finally:
        for sock in idle:
            sock.close()
    assert wait_compressed(node, 20)["instances"] == 20
    log = node.log_text()
    assert "had not asked for an association: [limits] max_pending_per_address = 16" in log


def test_a_connection_that_never_asks_is_closed_after_the_request_timeout(make_node) -> None:
    node = make_node("[limits]\nassociation_request_timeout = 1\n")
    sock = _connect(node)
    assert _closed_by_node(sock) == b""  # closed, nothing sent


def test_a_trickling_sender_is_cut_off_after_the_read_timeout(make_node) -> None:
    node = make_node("[limits]\npdu_read_timeout = 2\nidle_timeout = 600\n")
    sock = _associate_raw(node)
    sock.sendall(struct.pack(">BxI", 0x04, 1000))  # a P-DATA-TF claiming 1000 bytes
    cut = None
    for _ in range(60):  # a byte a second: the idle timeout never fires
        try:
            sock.sendall(b"\0")
        except OSError:
            cut = True
            break
        sock.settimeout(1)
        try:
            if sock.recv(65536) == b"":
                cut = True
                break
        except TimeoutError:
            continue
        except OSError:
            cut = True
            break
    assert cut, "the node kept reading a PDU trickled a byte a second"
    assert "did not arrive whole within 2 s ([limits] pdu_read_timeout)" in node.log_text()


def test_a_pdu_over_the_limit_is_refused_before_it_is_read(make_node) -> None:
    node = make_node()
    before = _rss_mb(node)
    sock = _associate_raw(node)
    sock.sendall(struct.pack(">BxI", 0x04, 0xFFFFFFF0))  # claims 4 GiB
    sent = 0
    try:  # keep sending: the node must not be reading (and holding) any of it
        chunk = bytes(1 << 20)
        while sent < 200 << 20:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    reply = _closed_by_node(sock)
    assert reply[:1] in (b"\x07", b""), reply[:16]  # an A-ABORT, or just the close
    assert _rss_mb(node) - before < 50  # flat: measured +0-5 MB, where 4 GiB was claimed
    assert "claims 4294967280 bytes, over 1048576 ([node] max_pdu)" in node.log_text()


def test_a_data_set_over_the_limit_is_refused_with_memory_flat(make_node) -> None:
    node = make_node("[limits]\nmax_dataset_bytes = 8388608\n")  # 8 MiB
    before = _rss_mb(node)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb(node))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    ae = AE(ae_title="BIGSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, max_pdu=1 << 20)
    try:
        ds = pydicom.dcmread(dicomdata.fresh_copy("RG1_UNCR.dcm", node.data_dir.parent))
        ds.PixelData = bytes(200 << 20)  # a 200 MB data set
        ds.Rows, ds.Columns = 10240, 10240
        status = assoc.send_c_store(ds)
        assert "Status" not in status  # no answer: the node aborted
        # The client reads the A-ABORT, or sees the connection close first when its send
        # fails (pynetdicom 3.0.4 then reports an A-P-ABORT); either way its association
        # thread sets is_aborted after send_c_store has returned, so wait for that thread.
        assoc.join(timeout=30)
        assert assoc.is_aborted and not assoc.is_established
    finally:
        stop.set()
        sampler.join()
        assoc.abort()
    assert peak[0] - before < 60, (before, peak[0])  # flat, where 200 MB were sent
    assert "([limits] max_dataset_bytes)" in node.log_text()
    assert node.echo().returncode == 0


def test_a_big_data_set_is_spooled_to_a_file_and_stored_exactly(make_node, tmp_path) -> None:
    node = make_node("[limits]\nspool_dataset_bytes = 1048576\n")  # 1 MiB; CR 7 MB
    src = dicomdata.fresh_copy("RG1_UNCR.dcm", tmp_path)
    res = node.store([src])
    assert peers.store_ok(res, [src]), res.stdout[-2000:]
    wait_compressed(node, 1)
    out = tmp_path / "out"
    assert node.export(out).returncode == 0
    (exported,) = exported_by_sop(out).values()
    assert dicomdata.read_pixels(exported).tobytes() == dicomdata.read_pixels(src).tobytes()
    assert not list((node.data_dir / "spool").glob("*")), "the spool file was left behind"


def test_associations_per_calling_ae_are_capped(make_node) -> None:
    node = make_node("[limits]\nmax_associations_per_ae = 2\n")

    def associate(calling: str):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        return ae.associate(node.host, node.port, ae_title=node.ae_title)

    held = [associate("GREEDY"), associate("GREEDY")]
    try:
        assert all(a.is_established for a in held)
        third = associate("GREEDY")
        assert third.is_rejected
        other = associate("POLITE")
        assert other.is_established
        other.release()
    finally:
        for a in held:
            a.release()
    assert "[limits] max_associations_per_ae = 2 reached" in node.log_text()


@pytest.mark.parametrize(
    ("calling", "accepted"),
    [
        (b"BAD\tAE", False),  # a control character
        (b"BAD\\AE", False),  # backslash
        (b"  MODALITY  ", True),  # leading and trailing spaces are not significant
    ],
)
def test_calling_ae_titles_the_ae_vr_forbids_are_refused(make_node, calling, accepted) -> None:
    node = make_node('[access]\nstore = ["MODALITY"]\n')
    sock = _connect(node)
    try:
        sock.sendall(rawfind.association_request(node.ae_title, calling, VERIFICATION))
        pdu_type, body = rawfind.read_pdu(sock)
    finally:
        sock.close()
    if accepted:
        assert pdu_type == 0x02
    else:
        assert pdu_type == 0x03, pdu_type  # A-ASSOCIATE-RJ
        assert tuple(body[1:4]) == (0x01, 0x01, 0x03), body  # calling AE not recognised
        assert "is not valid" in node.log_text()


def test_calling_ae_of_spaces_only_is_refused(make_node) -> None:
    """pynetdicom cannot even decode such a request: an A-ABORT, with one log line."""
    node = make_node()
    sock = _connect(node)
    try:
        sock.sendall(rawfind.association_request(node.ae_title, b" " * 16, VERIFICATION))
        reply = _closed_by_node(sock)
    finally:
        sock.close()
    assert reply[:1] in (b"\x03", b"\x07"), reply[:16]  # A-ASSOCIATE-RJ or A-ABORT
    log = node.log_text()
    assert "must not consist entirely of spaces" in log and "Traceback" not in log


def test_peer_resets_and_undecodable_pdus_are_one_log_line_each(make_node) -> None:
    node = make_node()
    sock = _connect(node)
    sock.sendall(b"\x09\x00\x00\x00\x00\x04abcd")  # no such PDU type
    _closed_by_node(sock)
    sock = _associate_raw(node)
    sock.sendall(struct.pack(">BxI", 0x04, 4) + b"\xff\xff\xff\xff")  # PDV longer than PDU
    _closed_by_node(sock)
    sock = _associate_raw(node)
    sock.sendall(struct.pack(">BxI", 0x04, 100) + b"\0" * 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset mid-PDU
    assert node.echo().returncode == 0
    log = node.log_text()
    assert "unknown PDU type 0x09" in log
    assert "undecodable PDU" in log
    assert "Traceback" not in log, log[log.index("Traceback") :][:3000]


def test_cmove_by_a_caller_that_may_not_retrieve_gets_0124(make_node, tmp_path) -> None:
    node = make_node(
        '[access]\nstore = ["*"]\nquery = ["*"]\nretrieve = ["VIEWER"]\n'
        '[move_destinations]\nVIEWER = "127.0.0.1:1"\n'
    )
    files = dicomdata.ct_series(tmp_path / "ct", 1)
    assert peers.store_ok(node.store(files), files)
    ae = AE(ae_title="NOSY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    try:
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID
        statuses = [
            status.Status
            for status, _ds in assoc.send_c_move(
                identifier, "VIEWER", StudyRootQueryRetrieveInformationModelMove
            )
            if status
        ]
    finally:
        assoc.release()
    assert statuses == [0x0124], [hex(s) for s in statuses]
    assert "refused retrieve for NOSY" in node.log_text()
