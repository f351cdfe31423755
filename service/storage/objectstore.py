"""An S3-compatible bucket as a tier's root: the blob store of archive.Archive, over boto3.

A tier move's protocol is the file tier's (blobstore.py): each blob is written once, to a
fresh key, and never overwritten; the index switches to it only after it is verified; the
old blob is deleted by the sweep after the grace period. What changes is what makes a write
durable and how it is verified:

- **Write**: one PUT carrying the blob's SHA-256 (x-amz-checksum-sha256). The store checks
  the body against it before it stores anything, and a PUT is atomic: a crash or a kill
  mid-upload leaves the whole object or none, never half (no temp key, no rename). Blobs go
  up in one PUT, so one blob is at most 5 GiB (S3's limit for a PUT).
- **Verify**: a HEAD then compares the size and the SHA-256 the store reports for the key
  with ours. A store that reports no SHA-256 (one that predates the flexible checksums) has
  the object read back and hashed instead.
- **Read**: whole-object GETs ask for the stored checksum and compare it with the bytes
  served; every read is also hashed here against the checksum the index recorded, as for a
  file. One instance of a series volume is read with ranged GETs (`mapped`): the volume's
  header and group table, then the one group of frames that holds it.
- **Orphans**: keys under the prefix that no index row knows, older than a lease, are what a
  killed move left (ArchiveService.remove_leftovers deletes them, as it does files). The
  prefix therefore belongs to one compacs archive.

Errors come out as the OSError kinds the rest of the node already handles: a missing key as
FileNotFoundError (a read then re-reads the index row once, fixity reports it), anything else
the store or the network says as an OSError naming the bucket and what to check.

Targets: AWS S3, MinIO and Ceph RGW, path-style addressing for any store given by
`endpoint_url`. Tested against moto's standalone server only (docs/design.md says what that
leaves untested).
"""

from __future__ import annotations

import base64
import hashlib
import mmap
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any, BinaryIO

from compacs.service.storage.archive import CHUNK, Archive, ChecksumError, check_part, checksum
from compacs.service.storage.blobstore import S3_SCHEME, StoreSpec

FIRST_FETCH = 64 << 10  # a volume's first ranged GET: its prefix, header and group table


class ObjectStoreError(OSError):
    """The store, or the way to it, refused or failed; the message says which and why."""


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class ObjectStore:
    """blobstore.BlobStore on a bucket; keys are `<prefix>/<relpath>`."""

    stored_path = staticmethod(Archive.stored_path)  # the same layout as a folder's

    def __init__(self, spec: StoreSpec) -> None:
        if not spec.is_bucket:
            raise ValueError(f"{spec.root!r} is not an s3://bucket/prefix root")
        self.spec = spec
        self.bucket, _, prefix = spec.root[len(S3_SCHEME) :].partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    @cached_property
    def client(self) -> Any:
        """Made at first use: opening a node's tiers costs nothing until one is read."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise ObjectStoreError(
                f"{self.spec.root}: an object-storage tier needs boto3: pip install 'compacs[s3]'"
            ) from exc
        config = Config(
            s3={"addressing_style": "path"} if self.spec.endpoint_url else {},
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
            # our own SHA-256 goes with each PUT; botocore adds no CRC of its own
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.spec.endpoint_url,
            region_name=self.spec.region,
            aws_access_key_id=self.spec.access_key_id,
            aws_secret_access_key=self.spec.secret_access_key,
            config=config,
        )

    def key(self, relpath: str) -> str:
        return self.prefix + relpath

    def _where(self, relpath: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key(relpath)}"

    def _call(self, operation: str, relpath: str, **params: Any) -> Any:
        """One S3 call; its failures as the OSError kinds the node handles, with a message
        saying what was wrong and what to do."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self._where(relpath)}: no such object") from None
            if code == "NoSuchBucket":
                raise ObjectStoreError(
                    f"{S3_SCHEME}{self.bucket}: no such bucket on "
                    f"{self.spec.endpoint_url or 'AWS S3'}: create it (compacs does not create "
                    "buckets) or correct the tier's root"
                ) from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ObjectStoreError(
                    f"{self._where(relpath)}: {operation} refused ({code}): check the tier's "
                    "credentials and that they may read, write, list and delete in this bucket"
                ) from None
            message = error.get("Message") or str(exc)
            raise ObjectStoreError(
                f"{self._where(relpath)}: {operation}: {code} {message}"
            ) from None
        except NoCredentialsError:
            raise ObjectStoreError(
                f"{S3_SCHEME}{self.bucket}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or a profile or role) for the node, or access_key_id "
                "and secret_access_key in the tier's s3 table"
            ) from None
        except BotoCoreError as exc:  # the endpoint unreachable, a timeout, a bad response
            raise ObjectStoreError(
                f"{self._where(relpath)}: {operation} failed: {exc} (is "
                f"{self.spec.endpoint_url or 'AWS S3'} reachable?)"
            ) from None

    # --- write and verify ---
    def write(self, relpath: str, data: bytes) -> str:
        """PUT `data` at a fresh key, verify it against what the store reports, return its
        checksum. A blob that does not verify is deleted again, and the write raises."""
        digest = hashlib.sha256(data).digest()
        self._call(
            "put_object",
            relpath,
            Key=self.key(relpath),
            Body=data,
            ChecksumAlgorithm="SHA256",  # without it some stores keep no checksum (moto)
            ChecksumSHA256=_b64(digest),
        )
        try:
            self._verify(relpath, len(data), digest)
        except ChecksumError:
            self.delete(relpath)
            raise
        return "sha256:" + digest.hex()

    def _verify(self, relpath: str, size: int, digest: bytes) -> None:
        head = self._call("head_object", relpath, Key=self.key(relpath), ChecksumMode="ENABLED")
        if head.get("ContentLength") != size:
            raise ChecksumError(
                f"{self._where(relpath)}: the store holds {head.get('ContentLength')} bytes "
                f"after a PUT of {size}"
            )
        reported = head.get("ChecksumSHA256")
        if reported is None:  # a store without flexible checksums: read it back
            if checksum(self.read(relpath)) != "sha256:" + digest.hex():
                raise ChecksumError(f"{self._where(relpath)}: read back, it differs from the PUT")
        elif reported != _b64(digest):
            raise ChecksumError(
                f"{self._where(relpath)}: the store reports SHA-256 {reported}, the PUT sent "
                f"{_b64(digest)}"
            )

    # --- reads ---
    def read(self, relpath: str, expected_checksum: str | None = None) -> bytes:
        got = self._call("get_object", relpath, Key=self.key(relpath), ChecksumMode="ENABLED")
        data = got["Body"].read()
        ours = checksum(data)
        reported = got.get("ChecksumSHA256")
        if reported is not None and "sha256:" + base64.b64decode(reported).hex() != ours:
            raise ChecksumError(
                f"{self._where(relpath)}: the bytes served do not match the SHA-256 the store "
                f"reports for them ({reported})"
            )
        if expected_checksum is not None and ours != expected_checksum:
            raise ChecksumError(
                f"{self._where(relpath)}: checksum mismatch (expected {expected_checksum})"
            )
        return data

    def _get_range(self, relpath: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes [start, end) (fewer at the object's end) and the object's whole size."""
        got = self._call(
            "get_object", relpath, Key=self.key(relpath), Range=f"bytes={start}-{end - 1}"
        )
        total = got.get("ContentRange", "").rpartition("/")[2]
        data = got["Body"].read()
        return data, int(total) if total.isdigit() else start + len(data)

    def read_range(self, relpath: str, offset: int, length: int, expected_checksum: str) -> bytes:
        """As Archive.read_range: one ranged GET."""
        data, _size = self._get_range(relpath, offset, offset + length)
        if len(data) != length:
            raise ChecksumError(
                f"{self._where(relpath)}: {len(data)} bytes at {offset}, expected {length}"
            )
        if checksum(data) != expected_checksum:
            raise ChecksumError(
                f"{self._where(relpath)}: checksum mismatch (expected {expected_checksum})"
            )
        return data

    def open_checked(
        self, relpath: str, offset: int, length: int, expected_checksum: str
    ) -> BinaryIO:
        """As Archive.open_checked: the part streamed into a temporary file, hashed on the
        way, at the same offset as in the blob (the bytes before it are a hole, not written),
        so that a big instance is sent from disk, never held whole in memory."""
        got = self._call(
            "get_object",
            relpath,
            Key=self.key(relpath),
            Range=f"bytes={offset}-{offset + length - 1}",
        )
        file = tempfile.TemporaryFile()  # noqa: SIM115 - the caller closes it
        try:
            file.seek(offset)
            digest, size = hashlib.sha256(), 0
            for chunk in got["Body"].iter_chunks(CHUNK):
                digest.update(chunk)
                file.write(chunk)
                size += len(chunk)
            check_part(self._where(relpath), offset, length, size, digest, expected_checksum)
            file.seek(offset)
            return file
        except BaseException:
            file.close()
            raise

    @contextmanager
    def mapped(self, relpath: str) -> Iterator[_RangedMap]:
        """The blob as an anonymous mapping of its size, filled only where `fetch` is asked:
        pages never fetched are never touched, so they cost neither a GET nor memory."""
        first, size = self._get_range(relpath, 0, FIRST_FETCH)
        with mmap.mmap(-1, max(1, size)) as whole:
            view = _RangedMap(self, relpath, memoryview(whole)[:size])
            view.fill(0, first)
            try:
                yield view
            finally:
                view.buffer.release()

    # --- delete and list ---
    def delete(self, relpath: str) -> None:
        """A key that is gone already is not an error (S3's DELETE is idempotent)."""
        self._call("delete_object", relpath, Key=self.key(relpath))

    def blobs(self, older_than: float = 0.0, under: str = "") -> Iterator[str]:
        """Blob keys under the prefix (relative paths, as the index records them) at least
        `older_than` seconds old by the store's LastModified."""
        now = time.time()
        params: dict[str, Any] = {"Prefix": self.prefix + under}
        while True:
            page = self._call("list_objects_v2", under, **params)
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith(".dcm") and now - item["LastModified"].timestamp() >= older_than:
                    yield key[len(self.prefix) :]
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]


class _RangedMap:
    """blobstore.Mapped for a bucket: each `fetch` of a range not yet held is one ranged GET."""

    def __init__(self, store: ObjectStore, relpath: str, buffer: memoryview) -> None:
        self.store, self.relpath, self.buffer = store, relpath, buffer
        self._held: list[tuple[int, int]] = []

    def fill(self, start: int, data: bytes) -> None:
        self.buffer[start : start + len(data)] = data
        self._held.append((start, start + len(data)))

    def fetch(self, start: int, end: int) -> None:
        end = min(end, len(self.buffer))
        if start >= end or any(a <= start and end <= b for a, b in self._held):
            return
        data, _size = self.store._get_range(self.relpath, start, end)
        if len(data) != end - start:
            raise ChecksumError(
                f"{self.store._where(self.relpath)}: {len(data)} bytes at {start}, "
                f"expected {end - start}"
            )
        self.fill(start, data)
