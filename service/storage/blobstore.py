"""What the tier code asks of a storage root, and which store a root names.

A tier's root is a folder (archive.Archive) or an S3-compatible bucket
(objectstore.ObjectStore, `s3://bucket/prefix`). Both offer the interface below, so that the
protocol of a tier move (write durably to a fresh path, verify, switch the index rows, release
the old blob, delete it after the grace period) and fixity are one piece of code, whatever the
root. Paths are relative to the root and laid out alike in both (Archive.stored_path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class StoreSpec:
    """Where a store is and how to reach it: what a worker process needs to open it again.
    Credentials left out here come from boto3's usual chain (environment, profile, role)."""

    root: str  # a folder, or s3://bucket/prefix
    endpoint_url: str | None = None  # MinIO, Ceph RGW, a test server; None: AWS S3
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    @property
    def is_bucket(self) -> bool:
        return self.root.startswith(S3_SCHEME)


class Mapped(Protocol):
    """A blob mapped for random access (a series volume, to decode one group of frames).
    `buffer` spans the whole blob; only the ranges passed to `fetch` are sure to hold its
    bytes: a file maps all of them, a bucket fetches each range with one ranged GET."""

    buffer: memoryview

    def fetch(self, start: int, end: int) -> None: ...


class BlobStore(Protocol):
    """The blob operations a tier's root offers (archive.Archive for the full contract)."""

    spec: StoreSpec

    @staticmethod
    def stored_path(
        study_uid: str, series_uid: str, sop_uid: str, token: str, tier: str = "hot"
    ) -> str: ...

    def write(self, relpath: str, data: bytes) -> str: ...

    def read(self, relpath: str, expected_checksum: str | None = None) -> bytes: ...

    def read_range(
        self, relpath: str, offset: int, length: int, expected_checksum: str
    ) -> bytes: ...

    def open_checked(
        self, relpath: str, offset: int, length: int, expected_checksum: str
    ) -> BinaryIO: ...

    def mapped(self, relpath: str) -> AbstractContextManager[Mapped]: ...

    def delete(self, relpath: str) -> None: ...

    def blobs(self, older_than: float = 0.0, under: str = "") -> Iterator[str]: ...
