"""DICOM TLS ([tls], service/dimse/tls.py) against real clients: DCMTK's storescu, findscu
and echoscu with +tls, OpenSSL's s_client, and `compacs send/query/pull`.

Certificates are made by the openssl command for each test module: a CA, the node's
certificate (for 127.0.0.1 and localhost), a client certificate from that CA, and one from
a CA the node does not trust. DCMTK 3.6.7's getscu and movescu have no TLS options, so
C-GET over TLS is `compacs pull --via get` (pynetdicom's client).
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from pathlib import Path

import dicomdata
import peers
import pydicom
import pytest

from compacs.service.config import ConfigError, load_config

pytestmark = pytest.mark.peers
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0, f"openssl {' '.join(args)}:\n{res.stderr}"


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", cwd=cwd,
    )  # fmt: skip


def _signed(name: str, ca: str, cwd: Path, san: str | None = None) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd,
    )  # fmt: skip
    extra: list[str] = []
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; node.pem/key (SAN 127.0.0.1, localhost); client.pem/key (CN MODALITY) from
    the same CA; stranger.pem/key from other-ca; encrypted.key (a password-protected key)."""
    d = tmp_path_factory.mktemp("pki")
    _ca("ca", d)
    _ca("other-ca", d)
    _signed("node", "ca", d, san="IP:127.0.0.1,DNS:localhost")
    _signed("client", "ca", d)
    _signed("stranger", "other-ca", d)
    _openssl(
        "pkey", "-in", "node.key", "-aes128", "-passout", "pass:secret", "-out", "encrypted.key",
        cwd=d,
    )  # fmt: skip
    return d


def tls_config(pki: Path, port: int, **extra: object) -> str:
    lines = [
        "[tls]",
        f"port = {port}",
        f'certificate = "{pki / "node.pem"}"',
        f'key = "{pki / "node.key"}"',
        f'ca_bundle = "{pki / "ca.pem"}"',
    ]
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def dcmtk_tls(pki: Path, who: str = "client") -> list[str]:
    """DCMTK options: TLS with `who`'s key and certificate, trusting our CA."""
    return ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.pem"), "+cf", str(pki / "ca.pem")]


def compacs_tls(pki: Path, who: str = "client") -> list[str]:
    return [
        "--tls-ca-bundle", str(pki / "ca.pem"),
        "--tls-certificate", str(pki / f"{who}.pem"),
        "--tls-key", str(pki / f"{who}.key"),
    ]  # fmt: skip


def start_tls_node(make_node, pki: Path, *, limits: str = "", **tls: object):
    """A node with a TLS port beside its plain one (unless plain_port = false); returns
    (node, tls_port) once the TLS port listens."""
    tls_port = peers.free_port()
    config = tls_config(pki, tls_port, **tls) + limits
    node = make_node(config, start=False)
    node.wait_ready = lambda: peers.wait_for_port(
        LOOPBACK, tls_port, node.start_timeout, node.proc, node.log_path
    )
    node.start()
    if tls.get("plain_port", True):
        peers.wait_for_port(LOOPBACK, node.port, 60, node.proc, node.log_path)
    return node, tls_port


def wait_log(node: peers.CompacsProcess, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in node.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{node.log_tail(40)}"
        time.sleep(0.2)
    return node.log_text()


def sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------- DCMTK over TLS


def test_dcmtk_store_and_find_over_tls_compacs_get(make_node, make_storescp, pki, tmp_path):
    """storescu and findscu with +tls store and find; `compacs pull --via get` over TLS
    retrieves the study into a storescp; the node logs each TLS peer's certificate."""
    node, tls_port = start_tls_node(make_node, pki)
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "in", 3, study)
    res = peers.storescu(tls_port, files, extra=dcmtk_tls(pki), timeout=120)
    assert peers.store_ok(res, files), res.stdout
    assert node.stats()["instances"] == 3
    log = wait_log(node, "client certificate commonName=client")
    assert "TLS from 127.0.0.1" in log

    res = peers.findscu(
        tls_port,
        "SERIES",
        {"StudyInstanceUID": study, "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""},
        out_dir=tmp_path / "find",
        extra=dcmtk_tls(pki),
    )
    assert res.returncode == 0, res.stdout
    answers = [pydicom.dcmread(p) for p in sorted((tmp_path / "find").glob("rsp*.dcm"))]
    assert [(a.StudyInstanceUID, int(a.NumberOfSeriesRelatedInstances)) for a in answers] == [
        (study, 3)
    ]

    storescp = make_storescp()
    res = node.cli(
        "pull", "--from", f"COMPACS@127.0.0.1:{tls_port}", *compacs_tls(pki),
        "--via", "get", "--study", study, "--into", f"{storescp.aet}@127.0.0.1:{storescp.port}",
        "--from-ae", "PULLER",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 completed, 0 failed" in res.stdout, res.stdout
    assert {sop(p) for p in storescp.received()} == {sop(f) for f in files}


def test_client_without_certificate_or_from_another_ca_is_refused(make_node, pki, tmp_path):
    """require_client_certificate = true (the default): an anonymous TLS client and one whose
    certificate another CA signed get no association, and nothing is stored."""
    node, tls_port = start_tls_node(make_node, pki)
    files = dicomdata.ct_series(tmp_path / "in", 1)
    anonymous = ["+tla", "+cf", str(pki / "ca.pem")]
    res = peers.storescu(tls_port, files, extra=anonymous, halt=True, timeout=120)
    assert res.returncode != 0 and not peers.store_ok(res, files), res.stdout
    wait_log(node, "the client sent no certificate")
    res = peers.storescu(tls_port, files, extra=dcmtk_tls(pki, "stranger"), halt=True, timeout=120)
    assert res.returncode != 0 and not peers.store_ok(res, files), res.stdout
    wait_log(node, "does not chain to [tls] ca_bundle")
    assert node.stats()["instances"] == 0
    # the same client with a certificate of our CA is let in
    res = peers.storescu(tls_port, files, extra=dcmtk_tls(pki), timeout=120)
    assert peers.store_ok(res, files), res.stdout
    assert node.stats()["instances"] == 1


def test_plain_client_refused_on_tls_port_served_on_plain_port(make_node, pki, tmp_path):
    node, tls_port = start_tls_node(make_node, pki)
    files = dicomdata.ct_series(tmp_path / "in", 1)
    res = peers.storescu(tls_port, files, halt=True, timeout=120)
    assert res.returncode != 0 and not peers.store_ok(res, files), res.stdout
    wait_log(node, "does not speak TLS")
    assert node.stats()["instances"] == 0
    res = node.store(files)
    assert peers.store_ok(res, files), res.stdout
    assert node.stats()["instances"] == 1


def _still_open(sock: socket.socket) -> bool:
    """True while the node has not closed `sock` (nothing to read, no EOF)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNRESET, errno.EPIPE)


def test_silent_tls_client_does_not_block_others(make_node, pki, tmp_path):
    """Clients that open the TLS port and say nothing do not keep a TLS client from
    associating (pynetdicom alone would handshake with them in its accept loop, forever),
    and are closed after [limits] association_request_timeout."""
    node, tls_port = start_tls_node(
        make_node, pki, limits="[limits]\nassociation_request_timeout = 20\n"
    )
    silent = [socket.create_connection((LOOPBACK, tls_port), timeout=10) for _ in range(3)]
    for s in silent:
        s.setblocking(False)
    try:
        files = dicomdata.ct_series(tmp_path / "in", 2)
        res = peers.storescu(tls_port, files, extra=dcmtk_tls(pki), timeout=60)
        assert peers.store_ok(res, files), res.stdout
        res = peers.run_dcmtk(
            "echoscu", *dcmtk_tls(pki), "-aec", "COMPACS", LOOPBACK, str(tls_port), timeout=60
        )
        assert res.returncode == 0, res.stdout
        assert all(_still_open(s) for s in silent), "the silent clients were closed too early"
        wait_log(node, "no TLS handshake within [limits] association_request_timeout", 120)
        deadline = time.monotonic() + 60
        while any(_still_open(s) for s in silent):
            assert time.monotonic() < deadline, "a silent client was never closed"
            time.sleep(0.2)
    finally:
        for s in silent:
            s.close()
    assert node.stats()["instances"] == 2


def _s_client(tls_port: int, pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{tls_port}"]
    cmd += ["-cert", str(pki / "client.pem"), "-key", str(pki / "client.key")]
    cmd += ["-CAfile", str(pki / "ca.pem"), "-verify_return_error", *args]
    return subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60)


def test_old_tls_and_weak_ciphers_refused_bcp195_accepted(make_node, pki):
    """TLS 1.1 and a non-BCP 195 TLS 1.2 suite are refused; TLS 1.2 with a BCP 195 suite and
    TLS 1.3 are accepted."""
    node, tls_port = start_tls_node(make_node, pki)
    # SECLEVEL=0: let this OpenSSL client offer what its defaults would not
    old = _s_client(tls_port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0, old.stdout
    wait_log(node, "older than 1.2 (UNSUPPORTED_PROTOCOL)")
    weak = _s_client(tls_port, pki, "-tls1_2", "-cipher", "AES128-SHA:AES256-SHA256")
    assert weak.returncode != 0, weak.stdout
    wait_log(node, "no BCP 195 cipher suite in common")
    good = _s_client(tls_port, pki, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Protocol  : TLSv1.2" in good.stdout and "ECDHE-RSA-AES256-GCM-SHA384" in good.stdout
    wait_log(node, "TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384, client certificate")
    new = _s_client(tls_port, pki, "-tls1_3")
    assert new.returncode == 0, new.stdout + new.stderr
    assert "TLSv1.3" in new.stdout


# --------------------------------------------------------------------------- compacs as SCU


def test_compacs_send_query_over_tls(make_node, pki, tmp_path):
    node, tls_port = start_tls_node(make_node, pki)
    study = pydicom.uid.generate_uid()
    files = dicomdata.ct_series(tmp_path / "in", 2, study)
    to = f"COMPACS@127.0.0.1:{tls_port}"
    res = node.cli("send", "--to", to, *compacs_tls(pki), *map(str, files))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sent 2 file(s)" in res.stdout and "(TLS)" in res.stdout
    res = node.cli(
        "query", "--from", to, *compacs_tls(pki), "--json", "-k", f"StudyInstanceUID={study}"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"NumberOfStudyRelatedInstances": "2"' in res.stdout
    # localhost is in the node's certificate too
    res = node.cli("query", "--from", f"COMPACS@localhost:{tls_port}", *compacs_tls(pki))
    assert res.returncode == 0, res.stdout + res.stderr

    # what a user gets wrong: one line each, exit 2
    res = node.cli("query", "--from", to, "--tls")  # system CAs do not know ours
    assert res.returncode == 2 and "certificate verify failed" in res.stderr, res.stderr
    assert "--tls-ca-bundle" in res.stderr and "Traceback" not in res.stderr
    res = node.cli("query", "--from", f"COMPACS@127.0.0.1:{node.port}", *compacs_tls(pki))
    assert res.returncode == 2 and "TLS with" in res.stderr and "TLS port" in res.stderr
    res = node.cli("query", "--from", to, "--tls-ca-bundle", str(pki / "ca.pem"))
    assert res.returncode == 2 and "refused our TLS certificate" in res.stderr, res.stderr
    mismatch = ["--tls-certificate", str(pki / "client.pem"), "--tls-key", str(pki / "node.key")]
    res = node.cli("query", "--from", to, "--tls-ca-bundle", str(pki / "ca.pem"), *mismatch)
    assert res.returncode == 2 and "--tls-key" in res.stderr and "does not belong" in res.stderr


def test_tls_only_with_optional_client_certificates(make_node, pki, tmp_path):
    """plain_port = false: only the TLS port listens; require_client_certificate = false:
    an anonymous client is let in, a certificate from an unknown CA still is not."""
    node, tls_port = start_tls_node(
        make_node, pki, plain_port=False, require_client_certificate=False
    )
    assert not peers.port_open(LOOPBACK, node.port)
    files = dicomdata.ct_series(tmp_path / "in", 1)
    anonymous = ["+tla", "+cf", str(pki / "ca.pem")]
    res = peers.storescu(tls_port, files, extra=anonymous, timeout=120)
    assert peers.store_ok(res, files), res.stdout
    wait_log(node, "no client certificate")
    more = dicomdata.ct_series(tmp_path / "more", 1)
    res = peers.storescu(tls_port, more, extra=dcmtk_tls(pki, "stranger"), halt=True, timeout=120)
    assert not peers.store_ok(res, more), res.stdout
    assert node.stats()["instances"] == 1
    assert "plain port closed" in node.log_text()


# --------------------------------------------------------------------------- config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "compacs.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"certificate": '"/nonexistent/node.pem"'}, ["[tls] certificate", "cannot read"]),
        ({"certificate": '"{pki}/node.key"'}, ["[tls] certificate", "no PEM certificate"]),
        ({"key": '"{pki}/client.key"'}, ["[tls] key", "does not belong to the certificate"]),
        ({"key": '"{pki}/encrypted.key"'}, ["[tls] key", "encrypted"]),
        ({"key": '"{pki}/node.pem"'}, ["[tls] key", "no PEM private key"]),
        ({"ca_bundle": '""'}, ["[tls] ca_bundle", "required when require_client_certificate"]),
        ({"ca_bundle": '"{pki}/node.key"'}, ["[tls] ca_bundle", "no PEM CA certificate"]),
        ({"key": '""'}, ["[tls] key", "required when [tls] port is set"]),
        ({"port": "11112"}, ["[tls] port = 11112 is also [node] port", "plain_port = false"]),
        ({"port": "0", "plain_port": "false"}, ["plain_port = false needs a TLS port"]),
        ({"port": "70000"}, ["[tls] port", "0 to 65535"]),
        ({"require_client_certificate": '"no"'}, ["require_client_certificate", "true or false"]),
        ({"ciphers": '"ALL"'}, ["[tls] has unknown key(s) ciphers", "allowed keys: port"]),
    ],
)
def test_bad_tls_config_names_file_key_and_what_to_do(tmp_path, pki, change, expected) -> None:
    values = {
        "port": "2762",
        "certificate": '"{pki}/node.pem"',
        "key": '"{pki}/node.key"',
        "ca_bundle": '"{pki}/ca.pem"',
        **change,
    }
    text = "[tls]\n" + "".join(f"{k} = {v.format(pki=pki)}\n" for k, v in values.items())
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_good_tls_config_and_serve_refuses_a_bad_one_in_one_line(make_node, tmp_path, pki):
    path = _write(tmp_path, tls_config(pki, 2762))
    tls = load_config(path, env={}).tls
    assert (tls.port, tls.require_client_certificate, tls.plain_port) == (2762, True, True)
    assert load_config(None, env={}).tls.enabled is False

    bad = _write(tmp_path, tls_config(pki, 2762).replace("node.key", "client.key"))
    node = make_node(bad, start=False)
    port = str(peers.free_port())
    res = node.cli("serve", "--config", str(bad), "--data", str(tmp_path / "d"), "--port", port)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "[tls] key" in lines[0] and "does not belong" in lines[0], lines
