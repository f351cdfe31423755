"""Who we talk to: a peer's address (``AE@host:port``) and AE titles, checked as DICOM
allows them, so that a typo is reported before any connection is tried."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from compacs.service.dimse.scu.errors import AddressError


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network; `tls`: reached with DICOM TLS
    (dimse/tls.client_context), else plain TCP."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}" + (" (TLS)" if self.tls else "")


def check_ae_title(value: str, what: str = "AE title") -> str:
    """An AE title as DICOM allows it (1-16 printable ASCII characters, no backslash)."""
    title = value.strip()
    if not title or len(title) > 16:
        raise AddressError(f"{what} {value!r}: an AE title has 1 to 16 characters")
    if "\\" in title or not all(32 <= ord(c) < 127 for c in title):
        raise AddressError(f"{what} {value!r}: an AE title is printable ASCII without backslash")
    return title


def parse_peer(text: str, what: str = "address") -> Peer:
    """``AE@host:port`` (``AE@[::1]:104`` for IPv6) -> Peer; AddressError says what is wrong."""
    example = "write it as AE@host:port, e.g. ORTHANC@127.0.0.1:4242"
    ae, at, hostport = text.rpartition("@")
    if not at:
        raise AddressError(f"{what} {text!r}: no AE title; {example}")
    if not ae:
        raise AddressError(f"{what} {text!r}: the AE title before '@' is empty; {example}")
    ae = check_ae_title(ae, f"{what} {text!r}:")
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise AddressError(f"{what} {text!r}: IPv6 hosts are written [addr]:port")
        port = rest[1:]
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            raise AddressError(f"{what} {text!r}: no port after the host; {example}")
    if not host or any(c.isspace() for c in host):
        raise AddressError(f"{what} {text!r}: the host is empty or has spaces; {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AddressError(f"{what} {text!r}: the port must be a number from 1 to 65535")
    return Peer(ae, host, int(port))
