"""multipart/related bodies (RFC 2387) as DICOMweb uses them: written for WADO-RS answers,
read for STOW-RS requests. Small enough to keep here rather than pull python-multipart in,
which parses form-data, not related parts."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One part; `body` is bytes (or a view of stored bytes: a frame cut without a copy),
    or chunks of `length` bytes in all (a big object sent from its blob file, never held
    whole)."""

    content_type: str
    body: bytes | memoryview | Iterable[bytes]
    location: str | None = None
    length: int | None = None


def new_boundary() -> str:
    """128 random bits: a boundary must only not occur in the parts, which no secret
    protects (uuid4's system entropy was a twentieth of a frame request's time)."""
    return f"compacs-{random.getrandbits(128):032x}"


def content_type(boundary: str, part_type: str, syntax: str | None = None) -> str:
    """The Content-Type header of a multipart/related answer whose parts are `part_type`."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return value + (f"; transfer-syntax={syntax}" if syntax else "")


def encode(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body, part by part (a streaming response sends each as it is made)."""
    for part in parts:
        head = f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
        if part.location:
            head += f"Content-Location: {part.location}\r\n"
        whole = isinstance(part.body, bytes | bytearray | memoryview)
        size = len(part.body) if whole else part.length  # type: ignore[arg-type]
        head += f"Content-Length: {size}\r\n\r\n"
        yield head.encode("ascii")
        if whole:
            yield part.body  # type: ignore[misc]
        else:
            yield from part.body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


class MultipartError(ValueError):
    """A request body that is not the multipart/related it says it is (400)."""


def boundary_of(header: str) -> str:
    """The boundary parameter of a Content-Type header; raises MultipartError."""
    for field in header.split(";")[1:]:
        key, _, value = field.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"')
    raise MultipartError(
        f"Content-Type {header!r} has no boundary parameter: send "
        'multipart/related; type="application/dicom"; boundary=...'
    )


def decode(body: bytes, boundary: str) -> list[Part]:
    """The parts of `body`. The preamble before the first delimiter and the epilogue after
    the closing one are ignored, as RFC 2046 says."""
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise MultipartError(f"the body has no part delimited by --{boundary}")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, rest = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("a part has no blank line between its headers and its body")
        if rest.endswith(b"\r\n"):
            rest = rest[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append(Part(headers.get("content-type", ""), rest, headers.get("content-location")))
    return parts
