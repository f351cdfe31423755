"""DICOM TLS: the node's and the SCU's TLS contexts, and the server's handshake moved out of
pynetdicom's accept loop.

The profile is DICOM's Non-Downgrading BCP 195 TLS Secure Transport Connection Profile
(PS3.15 B.9), DCMTK 3.6.8's default: TLS 1.2 or newer (never an older version, whatever the
client offers), the TLS 1.2 cipher suites of that profile, and TLS 1.3 with OpenSSL's
suites (all AEAD). No renegotiation, no TLS compression.

Why the handshake is moved: pynetdicom 3.0.4 wraps each accepted socket in its accept loop
(AssociationServer.get_request) with a blocking handshake and no timeout, so one client
that opens the TLS port and says nothing stops every later connection. The server context
here wraps without handshaking (do_handshake_on_connect=False); the handshake then runs in
`handshake`, an EVT_CONN_OPEN handler, which pynetdicom triggers in the connection's own
thread, within `[limits] association_request_timeout`. Where that handler stands down
(another pynetdicom version: internals.guards), OpenSSL does the handshake at the first
read, in the association's thread: TLS and its checks are never skipped, only the explicit
timeout and its log line are.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from compacs.service.dimse import internals

log = logging.getLogger("compacs.tls")

# The TLS 1.2 suites of the Non-Downgrading BCP 195 profile (DCMTK 3.6.8: +py, its
# default), OpenSSL names. The DHE ones need Diffie-Hellman parameters, which Python's ssl
# does not generate: a server with an RSA key negotiates the ECDHE ones.
BCP195_TLS12_CIPHERS = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES256-GCM-SHA384",
)

# OpenSSL's reason for a failed server handshake -> what the administrator reads in the log
_HANDSHAKE_HINTS = {
    "WRONG_VERSION_NUMBER": "the client does not speak TLS (a plain DICOM client on the TLS "
    "port?) or offered a version older than TLS 1.2",
    "UNSUPPORTED_PROTOCOL": "the client offered only TLS versions older than 1.2",
    "NO_SHARED_CIPHER": "no BCP 195 cipher suite in common with the client",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate and "
    "[tls] require_client_certificate = true",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate does not chain to [tls] ca_bundle "
    "(or has expired)",
    "HTTP_REQUEST": "an HTTP request, not TLS",
}


class TlsSetupError(ValueError):
    """A TLS file that cannot be used; `key` names the [tls] key (or CLI option) at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose wrap_socket never handshakes: pynetdicom calls it in its
    accept loop, where a handshake would block every other connection."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(":".join(BCP195_TLS12_CIPHERS))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, which a service never answers.
    raise TlsSetupError("key", "the key file is encrypted; give it unencrypted")


def _readable(path: Path, key: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise TlsSetupError(key, f"cannot read {path}: {exc.strerror}") from exc


def _load_identity(context: ssl.SSLContext, certificate: Path, key: Path, keys: tuple[str, str]):  # noqa: ANN202
    """Load the certificate and its key; TlsSetupError names the file that is wrong."""
    cert_key, key_key = keys
    _readable(certificate, cert_key)
    _readable(key, key_key)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(certificate))
    except ssl.SSLError as exc:
        raise TlsSetupError(
            cert_key, f"{certificate} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from exc
    try:
        context.load_cert_chain(str(certificate), str(key), password=_refuse_password)
    except TlsSetupError as exc:
        raise TlsSetupError(key_key, f"{key}: {exc}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSetupError(
                key_key, f"the key {key} does not belong to the certificate {certificate}"
            ) from exc
        raise TlsSetupError(
            key_key, f"{key} holds no PEM private key the certificate can use ({exc.reason or exc})"
        ) from exc


def _load_cas(context: ssl.SSLContext, ca_bundle: Path, key: str) -> None:
    _readable(ca_bundle, key)
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
    except ssl.SSLError as exc:
        raise TlsSetupError(
            key, f"{ca_bundle} holds no PEM CA certificate ({exc.reason or exc})"
        ) from exc


def server_context(
    certificate: Path, key: Path, ca_bundle: Path | None, require_client_certificate: bool
) -> ssl.SSLContext:
    """The node's TLS context; TlsSetupError (naming the [tls] key) when a file is unusable.

    A client certificate is required, or, without require_client_certificate, checked
    against ca_bundle when the client sends one."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    _load_identity(context, certificate, key, ("certificate", "key"))
    if ca_bundle is not None:
        _load_cas(context, ca_bundle, "ca_bundle")
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif ca_bundle is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    certificate: Path | None, key: Path | None, ca_bundle: Path | None
) -> ssl.SSLContext:
    """An SCU's TLS context: the peer's certificate must chain to ca_bundle (the system's
    CAs without one) and name the host we connect to; ours is sent when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    if ca_bundle is not None:
        _load_cas(context, ca_bundle, "--tls-ca-bundle")
    else:
        context.load_default_certs()
    if certificate is not None or key is not None:
        if certificate is None or key is None:
            raise TlsSetupError(
                "--tls-certificate" if certificate is None else "--tls-key",
                "missing: --tls-certificate and --tls-key go together, give both",
            )
        _load_identity(context, certificate, key, ("--tls-certificate", "--tls-key"))
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no TLS handshake within [limits] association_request_timeout"
    reason = getattr(exc, "reason", None)
    if reason in _HANDSHAKE_HINTS:
        return f"{_HANDSHAKE_HINTS[reason]} ({reason})"
    if reason:
        return str(reason)
    return str(exc) or type(exc).__name__


def _subject(certificate: dict[str, Any] | None) -> str:
    if not certificate:
        return "no client certificate"
    parts = [f"{k}={v}" for rdn in certificate.get("subject", ()) for k, v in rdn]
    return "client certificate " + (", ".join(parts) or "(empty subject)")


def handshake(event: Any, timeout: float) -> None:
    """EVT_CONN_OPEN of the TLS server (after admission's): the TLS handshake in this
    connection's own thread, within `timeout` seconds. A failed one is one log line and a
    closed connection, which the association then sees as the peer's close."""
    if not internals.guards("the TLS handshake timeout"):
        return  # OpenSSL handshakes at the first read (see the module's docstring)
    assoc = event.assoc
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    address = assoc.requestor.address
    port = assoc.requestor.port
    if not isinstance(sock, ssl.SSLSocket):
        return  # already closed (admission evicted it)
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # SSLError, timeout, reset; ValueError: closed
        log.warning("TLS refused for %s:%s: %s", address, port, _reason(exc))
        # pynetdicom's own close: the socket goes, and the association, not started yet,
        # finds "connection closed" (Evt17) first; the bytes that came are never read.
        assoc.dul.socket.close()
        return
    with contextlib.suppress(OSError):
        sock.settimeout(previous)
    cipher = sock.cipher()
    log.info(
        "TLS from %s:%s: %s %s, %s",
        address,
        port,
        sock.version(),
        cipher[0] if cipher else "?",
        _subject(sock.getpeercert()),
    )
