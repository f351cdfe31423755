"""The storage area: Part-10 blobs on disk, written atomically and durably, with checksums.

Kept apart from the index as Orthanc keeps its storage area apart from its database: the
archive knows files and bytes, the index knows DICOM. Paths are built from hashes of UIDs,
so no string a peer sends ever becomes part of a path.

Layout under the archive root:
    incoming/<sop>-<token>.dcm                   objects as received, until compressed
    <tier>/<ab>/<study>/<series>/<sop>-<token>.dcm   stored objects (tier: hot, later cold)
    tmp/                                          temp files of writes in progress

Every write goes to a fresh path (the token is new for each received version and each
compression attempt), so two processes never write, or delete, the same file. Which files
are still wanted is the index's to say; the archive only tells how old a file is, so that
recovery removes what a crash left half-done and never what another live process is
writing (younger than any lease).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from compacs.service.storage.blobstore import StoreSpec

HASH_CHARS = 32
CHUNK = 1 << 20  # streamed reads and copies: what one big blob costs in memory at a time

_T = TypeVar("_T")


class ChecksumError(IOError):
    """A blob's bytes no longer match the checksum recorded when it was written."""


def check_part(where: str, offset: int, length: int, got: int, digest: Any, expected: str) -> None:
    """Raise ChecksumError unless `got` bytes read at `offset` are the `length` expected and
    hash (`digest`, a hashlib sha256 fed with them) to the recorded checksum: the one check
    of a part read for sending, from a folder (Archive) or a bucket (objectstore.py)."""
    if got != length:
        raise ChecksumError(f"{where}: {got} bytes at {offset}, expected {length}")
    if "sha256:" + digest.hexdigest() != expected:
        raise ChecksumError(f"{where}: checksum mismatch (expected {expected})")


def new_token() -> str:
    """A fresh name part for each write: no two writes, in any process, share a path."""
    return uuid.uuid4().hex[:16]


def uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:HASH_CHARS]


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_checksums(path: Path, start: int) -> tuple[str, str]:
    """The checksum of a whole file and that of its bytes from `start` on, in one streamed
    pass: a big received data set is hashed without being held in memory."""
    whole, tail = hashlib.sha256(), hashlib.sha256()
    buffer = bytearray(CHUNK)
    at = 0
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(buffer):
            view = memoryview(buffer)[:n]
            whole.update(view)
            if at + n > start:
                tail.update(view[max(0, start - at) :])
            at += n
    return "sha256:" + whole.hexdigest(), "sha256:" + tail.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """A folder as a blob store (blobstore.BlobStore; objectstore.ObjectStore is a bucket)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.spec = StoreSpec(str(self.root))
        self.tmp = self.root / "tmp"
        for sub in (self.root, self.tmp, self.root / "incoming"):
            sub.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    # --- paths (relative to root, as the index records them) ---
    @staticmethod
    def incoming_path(sop_uid: str, token: str) -> str:
        return f"incoming/{uid_hash(sop_uid)}-{token}.dcm"

    @staticmethod
    def stored_path(
        study_uid: str, series_uid: str, sop_uid: str, token: str, tier: str = "hot"
    ) -> str:
        study = uid_hash(study_uid)
        name = f"{uid_hash(sop_uid)}-{token}.dcm"
        return f"{tier}/{study[:2]}/{study}/{uid_hash(series_uid)}/{name}"

    def abspath(self, relpath: str) -> Path:
        return self.root / relpath

    # --- I/O ---
    def write(self, relpath: str, data: bytes) -> str:
        """Write `data` durably at `relpath` and return its checksum.

        Temp file, fsync, rename, fsync of the directory: after this returns, a crash or
        power loss leaves either the whole new blob or none; a reader never sees half.
        """

        def fill(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

        self._commit(relpath, fill)
        return checksum(data)

    def write_stream(self, relpath: str, produce: Callable[[BinaryIO], None]) -> tuple[int, str]:
        """As `write`, for a blob too big to hold: `produce` writes it into the open temp
        file (which it may also read back); its size and checksum are returned, the
        checksum computed by reading the file back in chunks. Nothing is left at `relpath`
        or in tmp/ if `produce` raises."""

        def fill(tmp: Path) -> tuple[int, str]:
            with open(tmp, "w+b") as file:
                produce(file)
                file.flush()
                file.seek(0)
                digest, size = hashlib.sha256(), 0
                buffer = bytearray(CHUNK)
                while n := file.readinto(buffer):
                    digest.update(memoryview(buffer)[:n])
                    size += n
                os.fsync(file.fileno())
            return size, "sha256:" + digest.hexdigest()

        return self._commit(relpath, fill)

    def adopt(self, relpath: str, src: Path) -> None:
        """Make the complete file `src` (a spooled data set) the blob at `relpath`, durably,
        without reading it into memory: a hard link where the two share a file system (the
        spool folder sits beside the archive), else a streamed copy. Then as `write`: fsync,
        rename, fsync of the directory. The caller hashed `src` already (file_checksums)."""

        def fill(tmp: Path) -> None:
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or links not allowed: copy
                with open(src, "rb") as source, open(tmp, "wb") as target:
                    shutil.copyfileobj(source, target, CHUNK)
            os.chmod(tmp, 0o644)  # as write's blobs (a spool file is private to the node)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self._commit(relpath, fill)

    def _commit(self, relpath: str, fill: Callable[[Path], _T]) -> _T:
        """The durable step `write`, `write_stream` and `adopt` share, so that each is only
        what it puts in the file: `fill` writes the temp file and fsyncs it; it is then
        renamed to `relpath` and its directory fsynced (a crash leaves the whole blob or
        none), and removed if anything fails. Returns what `fill` returns."""
        final = self.abspath(relpath)
        directory = final.parent
        if directory not in self._known_dirs:
            self._make_dirs(directory)
        tmp = self.tmp / f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            result = fill(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        return result

    def _make_dirs(self, directory: Path) -> None:
        """Create missing parents and fsync each new one's parent so the entry itself survives."""
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            _fsync_dir(d.parent)
        self._known_dirs.add(directory)

    def read(self, relpath: str, expected_checksum: str | None = None) -> bytes:
        data = self.abspath(relpath).read_bytes()
        if expected_checksum is not None and checksum(data) != expected_checksum:
            raise ChecksumError(f"{relpath}: checksum mismatch (expected {expected_checksum})")
        return data

    def read_range(self, relpath: str, offset: int, length: int, expected_checksum: str) -> bytes:
        """The `length` bytes at `offset` of a blob (one instance of a volume blob, or a whole
        Part-10 blob), checked against the checksum recorded for that part."""
        fd = os.open(self.abspath(relpath), os.O_RDONLY)
        try:  # one pread, no buffered file object: a viewer's frame is one such read
            data = os.pread(fd, length, offset)
            while len(data) < length:  # a read over 2 GiB comes back in parts
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
        if len(data) != length:
            raise ChecksumError(f"{relpath}: {len(data)} bytes at {offset}, expected {length}")
        if checksum(data) != expected_checksum:
            raise ChecksumError(f"{relpath}: checksum mismatch (expected {expected_checksum})")
        return data

    def open_checked(
        self, relpath: str, offset: int, length: int, expected_checksum: str
    ) -> BinaryIO:
        """The blob part `read_range` would return, as an open file positioned at `offset`,
        checked against its checksum by a streamed pass first: a big object is sent or
        exported from the file, never held whole in memory. The open file keeps the bytes
        readable even if the sweep deletes the blob meanwhile."""
        file = open(self.abspath(relpath), "rb")  # noqa: SIM115 - the caller closes it
        try:
            digest = hashlib.sha256()
            buffer = bytearray(CHUNK)
            file.seek(offset)
            left = length
            while left:
                n = file.readinto(memoryview(buffer)[: min(CHUNK, left)])
                if not n:
                    break
                digest.update(memoryview(buffer)[:n])
                left -= n
            check_part(relpath, offset, length, length - left, digest, expected_checksum)
            file.seek(offset)
            return file
        except BaseException:
            file.close()
            raise

    @contextmanager
    def mapped(self, relpath: str) -> Iterator[_FileMap]:
        """The blob mapped, not read: only the pages a reader touches are read from disk."""
        with (
            open(self.abspath(relpath), "rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as whole,
        ):
            view = _FileMap(memoryview(whole))
            try:
                yield view
            finally:
                view.buffer.release()

    def delete(self, relpath: str) -> None:
        self.abspath(relpath).unlink(missing_ok=True)

    def clean_tmp(self, older_than: float) -> int:
        """Remove temp files of writes a crash interrupted (never acknowledged), those older
        than `older_than` seconds: younger ones may be another live process' writes."""
        count = 0
        for leftover in self.tmp.iterdir():
            if age(leftover) > older_than:
                leftover.unlink(missing_ok=True)
                count += 1
        return count

    def blobs(self, older_than: float = 0.0, under: str = "") -> Iterator[str]:
        """Blob files on disk (relative paths) at least `older_than` seconds old, in the
        whole archive or `under` one of its folders."""
        for dirpath, _dirs, files in os.walk(self.root / under):
            rel = Path(dirpath).relative_to(self.root)
            if rel.parts[:1] == ("tmp",):
                continue
            for name in files:
                if name.endswith(".dcm") and age(Path(dirpath) / name) >= older_than:
                    yield str(rel / name)


class _FileMap:
    """blobstore.Mapped for a file: the mapping holds every byte already."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer

    def fetch(self, start: int, end: int) -> None:
        return None


def age(path: Path) -> float:
    """Seconds since the file was last written (0 when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SQLITE_FULL = 13  # "database or disk is full"
POSTGRES_DISK_FULL = "53100"


def disk_full(exc: Exception) -> bool:
    """Whether `exc` says the disk is full: a file write (ENOSPC, EDQUOT) or the index's own
    write (SQLite's SQLITE_FULL, PostgreSQL's disk_full), which the driver reports as its error
    under SQLAlchemy's: the sender should hear 0xA700 and retry either way."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlite_errorcode", None) == SQLITE_FULL or (
        getattr(orig, "sqlstate", None) == POSTGRES_DISK_FULL
    )
