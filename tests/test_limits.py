"""No lockout, bounded resources: [limits], the calling AE checks, and one log line (never a
traceback) for peers that misbehave on the wire.

The misbehaving peers here are bare sockets (tests/rawfind.py builds the PDUs), because
pynetdicom's own SCU would refuse to send what they send.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from pathlib import Path

import dicomdata
import peers
import psutil
import pydicom
import rawfind
from nodecheck import exported_by_sop, wait_compressed
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
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


def test_a_half_sent_association_request_is_closed_after_the_request_timeout(make_node) -> None:
    """The documented 5 s (the default), where it took the PDU read timeout's 30 s: the
    association thread's own 5 s wait could not end while the network thread sat in the
    read of the request."""
    node = make_node()
    sock = _connect(node)
    request = rawfind.association_request(node.ae_title, b"HALFSENT", VERIFICATION)
    started = time.monotonic()
    sock.sendall(request[: len(request) // 2])
    reply = _closed_by_node(sock, within=60)
    took = time.monotonic() - started
    assert reply[:1] in (b"", b"\x07"), reply[:16]  # closed, or an A-ABORT first
    assert took < 20, f"closed after {took:.1f} s"  # 5 s, with a loaded machine's margin
    assert "no complete A-ASSOCIATE-RQ within 5 s of connecting" in node.log_text()


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


def _raw_association(
    node: peers.CompacsProcess, calling: bytes, source: str
) -> tuple[socket.socket, int]:
    """A Verification association asked for from `source` (a loopback address of its own):
    the socket and the reply's PDU type (0x02 accepted, 0x03 rejected)."""
    sock = socket.create_connection((node.host, node.port), timeout=30, source_address=(source, 0))
    sock.sendall(rawfind.association_request(node.ae_title, calling, VERIFICATION))
    return sock, rawfind.read_pdu(sock)[0]


def test_one_peer_with_two_titles_and_two_addresses_cannot_take_every_slot(
    make_node, tmp_path: Path
) -> None:
    """The red team's hog: two AE titles from two addresses asking for every slot. With the
    default limits it gets two titles' share (2 x 16 of 64), and a third peer gets in."""
    node = make_node()
    held: list[socket.socket] = []
    try:
        for i in range(80):
            calling = (b"HOG1", b"HOG2")[i % 2]
            source = ("127.0.0.2", "127.0.0.3")[(i // 2) % 2]
            sock, pdu_type = _raw_association(node, calling, source)
            if pdu_type == 0x02:
                held.append(sock)
            else:
                assert pdu_type == 0x03, pdu_type
                sock.close()
        assert len(held) == 32, len(held)
        files = dicomdata.ct_series(tmp_path / "ct", 2)
        res = node.store(files)
        assert peers.store_ok(res, files), res.stdout[-2000:]
        assert node.echo().returncode == 0
    finally:
        for sock in held:
            sock.close()
    assert "[limits] max_associations_per_ae = 16 reached" in node.log_text()


def test_when_full_the_biggest_holder_gives_up_its_longest_idle_association(
    make_node, tmp_path: Path
) -> None:
    node = make_node(
        "[limits]\nmax_associations = 6\nmax_associations_per_ae = 6\n"
        "max_associations_per_address = 6\n"
    )
    held: list[socket.socket] = []
    try:
        for i in range(6):  # HOG1 from 127.0.0.2 and HOG2 from 127.0.0.3, 3 each
            sock, pdu_type = _raw_association(
                node, (b"HOG1", b"HOG2")[i % 2], ("127.0.0.2", "127.0.0.3")[i % 2]
            )
            held.append(sock)
            assert pdu_type == 0x02, i
        sock, pdu_type = _raw_association(node, b"HOG1", "127.0.0.2")
        sock.close()
        assert pdu_type == 0x03  # the biggest holder gains nothing by asking again
        time.sleep(3)  # the hog's associations are now idle (admission.EVICTABLE_AFTER_IDLE)
        assert node.echo().returncode == 0  # a third peer gets in
        files = dicomdata.ct_series(tmp_path / "ct", 2)
        assert peers.store_ok(node.store(files), files)
        closed = []
        for sock in held:
            sock.settimeout(0.5)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            closed.append(data[:1])
        assert len(closed) == 1 and closed[0] in (b"", b"\x07"), closed  # one A-ABORT
    finally:
        for sock in held:
            sock.close()
    log = node.log_text()
    assert "evicted the association of HOG" in log
    assert "for ECHOSCU from 127.0.0.1: [limits] max_associations = 6 reached" in log


def test_sigterm_with_an_association_held_open_exits_after_the_grace(
    make_node, tmp_path: Path
) -> None:
    """A client that keeps storing on one association: SIGTERM stops the listener, the
    association gets its grace (stores go on being acknowledged), is then aborted, and the
    node exits; every acknowledged object is there after a restart."""
    grace = 3
    node = make_node(f"[node]\nshutdown_grace_seconds = {grace}\n")
    template = pydicom.dcmread(dicomdata.ct_series(tmp_path / "ct", 1)[0])
    study = template.StudyInstanceUID
    ae = AE(ae_title="KEEPSTORING")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    acknowledged: list[str] = []

    def keep_storing() -> None:
        while assoc.is_established:
            template.SOPInstanceUID = generate_uid()
            template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
            status = assoc.send_c_store(template)
            if status and status.Status == 0x0000:
                acknowledged.append(template.SOPInstanceUID)
            time.sleep(0.02)  # a modality's pace, not a flood: the machine is shared

    sender = threading.Thread(target=keep_storing)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acknowledged) >= 5
        node.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        at_signal = len(acknowledged)
        returncode = node.proc.wait(timeout=grace + 120)
        took = time.monotonic() - signalled
    finally:
        sender.join(timeout=120)
        assoc.abort()
    assert returncode == 0
    assert took < grace + 25, f"exited {took:.1f} s after SIGTERM with a {grace} s grace"
    assert len(acknowledged) > at_signal  # the grace let it go on storing
    log = node.log_text()
    assert "aborting 1 association(s) still open after the 3 s grace: KEEPSTORING" in log
    assert "compacs stopped" in log
    node.stop()  # reaps the exited process
    node.start()
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, tmp_path / "got")
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    retrieved = {pydicom.dcmread(f).SOPInstanceUID for f in (tmp_path / "got").iterdir()}
    missing = set(acknowledged) - retrieved
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged objects lost"


# (called, calling, accepted)
AE_TITLE_CASES = [
    (b"COMPACS", b"BAD\tAE", False),  # a control character
    (b"COMPACS", b"MODALITY\t", False),  # pynetdicom strips a trailing one: not here
    (b"COMPACS", b"BAD\\AE", False),  # backslash
    (b"COMPACS", b"\xffAE", False),  # outside ASCII: pynetdicom logged a traceback
    (b"COMPACS", b" " * 16, False),  # spaces only: pynetdicom could not decode it
    (b"COMP\tACS", b"MODALITY", False),  # the called AE title is checked the same way
    (b"COMPACS", b"  MODALITY  ", True),  # leading and trailing spaces are not significant
    (b"COMPACS", b"MODALITY\0\0\0", True),  # NUL padding, as some devices send
]


def test_ae_titles_the_ae_vr_forbids_are_refused_with_one_log_line(make_node) -> None:
    node = make_node()
    for called, calling, accepted in AE_TITLE_CASES:
        before = node.log_text().count("association rejected")
        sock = _connect(node)
        try:
            pdu = rawfind.association_request(node.ae_title, calling, VERIFICATION)
            sock.sendall(pdu[:10] + called.ljust(16) + pdu[26:])
            pdu_type, body = rawfind.read_pdu(sock)
        finally:
            sock.close()
        case = (called, calling)
        if accepted:
            assert pdu_type == 0x02, case
            continue
        assert pdu_type == 0x03, case  # A-ASSOCIATE-RJ
        reason = 0x03 if called == b"COMPACS" else 0x07  # calling / called AE not recognised
        assert tuple(body[1:4]) == (0x01, 0x01, reason), (case, body[:4])
        field = "calling" if reason == 0x03 else "called"
        lines = [ln for ln in node.log_text().splitlines() if "association rejected" in ln]
        assert len(lines) == before + 1, case
        assert f"the {field} AE title is not valid" in lines[-1], lines[-1]
        assert "\t" not in lines[-1]  # shown escaped: a title cannot forge log lines
    assert node.echo().returncode == 0
    log = node.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") :][:3000]
    assert log.count("association rejected") == 6


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
