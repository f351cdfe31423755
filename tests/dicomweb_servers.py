"""DICOMweb servers for the browser test and bench/dicomweb.py, and the plain-HTTP parts of
the protocol both need (STOW-RS upload, multipart/related answers).

A server is a DICOMweb root URL plus a way to put files into it (:class:`DicomWebServer`):
today Orthanc with Debian's ``orthanc-dicomweb`` plugin, the reference the issue measures
against; compacs' own web face plugs in as another such pair. Plain urllib/http.client on
purpose: the same requests a browser makes, no client library deciding media types for us.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers

DICOMWEB_PLUGIN = peers.DICOMWEB_PLUGIN
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass
class DicomWebServer:
    """What a browser test or the bench needs of a server: where its DICOMweb root is and
    how to store files in it (C-STORE, REST or STOW-RS: the server's own best way)."""

    name: str
    root: str
    store: Callable[[Sequence[Path]], None]


def orthanc_dicomweb_config() -> dict[str, Any]:
    """Orthanc ``extra_config`` that loads the DICOMweb plugin at ``/dicom-web/`` (beside
    GDCM: the ``Plugins`` list replaces the harness's own)."""
    if not DICOMWEB_PLUGIN.exists():
        raise peers.PeerError(
            f"{DICOMWEB_PLUGIN} missing: apt-get install orthanc-dicomweb "
            "(tests/peers.py installs it with the other Debian peers)"
        )
    plugins = [str(p) for p in (peers.GDCM_PLUGIN, DICOMWEB_PLUGIN) if p.exists()]
    return {
        "Plugins": plugins,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


def orthanc_server(orthanc: peers.OrthancProcess) -> DicomWebServer:
    """A started Orthanc (with :func:`orthanc_dicomweb_config`) as a DICOMweb server that
    stores through its REST API (Orthanc's IngestTranscoding applies there too)."""

    def store(files: Sequence[Path]) -> None:
        for path in files:
            answer = orthanc.upload(path)
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise peers.PeerError(f"Orthanc did not store {path}: {answer}")

    return DicomWebServer("orthanc", f"{orthanc.url}/dicom-web", store)


def wait_compressed(origin: str, count: int, timeout: float = 120.0) -> str:
    """Until compacs' status page at ``origin`` counts ``count`` instances and none pending
    compression; its HTML. Read over HTTP: a ``compacs stats`` process per poll costs
    seconds on a busy machine. A deadline only, so a broken node fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        conn = connection(origin)
        try:
            status, _, body = get(conn, "/", "text/html")
        finally:
            conn.close()
        page = body.decode()
        found = {
            key: re.search(rf"<td>{key}</td><td>(\d+)</td>", page)
            for key in ("instances", "pending compression")
        }
        if status != 200 or None in found.values():
            raise peers.PeerError(f"compacs status page answered {status}: {page[:500]}")
        counts = {key: int(m.group(1)) for key, m in found.items() if m}
        if counts["instances"] >= count and counts["pending compression"] == 0:
            return page
        if time.monotonic() > deadline:
            raise AssertionError(f"not all compressed in {timeout:.0f} s: {counts}")
        time.sleep(0.3)


# --------------------------------------------------------------------------- HTTP


def connection(root: str, timeout: float = 120.0) -> http.client.HTTPConnection:
    """A keep-alive connection to the host of a DICOMweb root (http only: loopback tests)."""
    parts = urllib.parse.urlsplit(root)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"DICOMweb root must be an http:// URL, got {root!r}")
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


def root_path(root: str) -> str:
    return urllib.parse.urlsplit(root).path.rstrip("/")


def get(conn: http.client.HTTPConnection, url_path: str, accept: str) -> tuple[int, str, bytes]:
    """GET on a kept-alive connection: status, Content-Type, body (read whole)."""
    conn.request("GET", url_path, headers={"Accept": accept})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, resp.getheader("Content-Type", ""), body


def stow(root: str, files: Sequence[Path], batch: int = 50) -> None:
    """STOW-RS the files to ``{root}/studies``, ``batch`` instances per request; raises
    with the server's answer when a request is not 200 (all stored)."""
    conn = connection(root)
    try:
        for start in range(0, len(files), batch):
            boundary = uuid.uuid4().hex
            chunks: list[bytes] = []
            for path in files[start : start + batch]:
                chunks += [
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                    Path(path).read_bytes(),
                    b"\r\n",
                ]
            chunks.append(f"--{boundary}--\r\n".encode())
            ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
            conn.request(
                "POST",
                root_path(root) + "/studies",
                body=b"".join(chunks),
                headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
            )
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise peers.PeerError(
                    f"STOW-RS of {len(chunks) // 3} files to {root} answered {resp.status}: "
                    f"{answer[:2000]!r}"
                )
    finally:
        conn.close()


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (lower-cased headers, payload) each.

    Raises ValueError naming what is wrong: a server answering frames must send a boundary
    and well-formed parts, and a silently empty list would pass for "no frames".
    """
    found = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/related") or not found:
        raise ValueError(f"not a multipart/related answer with a boundary: {content_type!r}")
    delimiter = b"--" + found.group(1).encode()
    pieces = body.split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise ValueError(f"multipart body without a closing delimiter ({len(body)} bytes)")
    parts = []
    for piece in pieces[1:-1]:
        head, sep, payload = piece.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").strip().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload[:-2] if payload.endswith(b"\r\n") else payload))
    return parts


def transfer_syntax_of(part_type: str) -> str | None:
    """The ``transfer-syntax`` parameter of a part's Content-Type, if any."""
    found = re.search(r'transfer-syntax="?([0-9.]+)"?', part_type, re.IGNORECASE)
    return found.group(1) if found else None
