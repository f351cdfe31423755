"""Series volumes: the slices of one series in one blob, their pixel data coded together.

A series of single-frame slices of one geometry (classic CT/MR) is the largest redundancy in
imaging, and per-slice codecs cannot use it. A *series volume* blob holds the slices' pixel
data as one volume codestream (codecs/volume.py: a random-access point every gop_size frames)
and each instance's data set without its pixel data:

    b"CSER" | version u8 | u64 codestream length | codestream | header 0 | header 1 | ...

Each instance's index row points at its header (offset, length, checksum of that part) and
at its frame in the volume (frame_first). Reading one slice reads its header and the one
group of frames that holds it, so it decodes at most gop_size frames; reading the series goes
through `VolumeReader`, which keeps the groups it decoded, so the volume is decoded once, not
once per slice. A header is the instance as a Part-10 file (explicit VR little endian) with an
empty Pixel Data element, which reading fills with the decoded frame.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.codecs.volume import HEADER_SIZE, header_length, read_header
from compacs.service import metrics
from compacs.service.compress import part10, shallow_copy
from compacs.service.storage.blobstore import BlobStore
from compacs.service.syntaxes import EXPLICIT_LE

MAGIC = b"CSER"
VERSION = 1
_PREFIX = struct.Struct("<4sBQ")


def pack(codestream: bytes, headers: Sequence[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """The series volume blob, and where each header lies in it (offset, length)."""
    parts, spans = [_PREFIX.pack(MAGIC, VERSION, len(codestream)), codestream], []
    at = _PREFIX.size + len(codestream)
    for header in headers:
        spans.append((at, len(header)))
        parts.append(header)
        at += len(header)
    return b"".join(parts), spans


def header_of(ds: Dataset) -> bytes:
    """An instance's header: the data set with an empty Pixel Data, as explicit VR LE Part-10."""
    out = shallow_copy(ds)
    out.file_meta = shallow_copy(ds.file_meta)
    out.file_meta.TransferSyntaxUID = EXPLICIT_LE
    out[0x7FE00010] = DataElement(0x7FE00010, "OB", b"")
    return part10(out)


def codestream_span(prefix: bytes) -> tuple[int, int]:
    magic, version, length = _PREFIX.unpack_from(prefix)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a compacs series volume (magic {magic!r}, version {version})")
    return _PREFIX.size, length


class VolumeReader:
    """Slices out of series volume blobs, with the groups of frames last decoded kept
    (a bounded number: a C-GET of a series decodes each group once)."""

    def __init__(self, groups_kept: int = 8) -> None:
        self._cache: OrderedDict[tuple[str, int], list[np.ndarray]] = OrderedDict()
        self._kept = groups_kept
        self._lock = threading.Lock()

    def slice_part10(
        self,
        store: BlobStore,
        relpath: str,
        offset: int,
        length: int,
        expected: str,
        frame: int,
        codec_name: str,
    ) -> bytes:
        """The Part-10 bytes (explicit VR LE, native pixel data) of the instance whose header
        lies at `offset` in the series volume `relpath` of `store`, frame `frame` of its
        volume."""
        ds = dcmread(BytesIO(store.read_range(relpath, offset, length, expected)))
        fmt = PixelFormat.from_dataset(ds)
        pixels = self._frame(store, relpath, frame, fmt, codec_name)
        data = np.ascontiguousarray(pixels, dtype=fmt.dtype).tobytes()
        ds.PixelData = data + b"\0" * (len(data) % 2)
        ds["PixelData"].VR = "OW" if fmt.bits_allocated > 8 else "OB"
        return part10(ds)

    def header(
        self, store: BlobStore, relpath: str, offset: int, length: int, expected: str
    ) -> Dataset:
        """The data set of the instance whose header lies at `offset`, without its pixel
        data and without decoding any frame (DICOMweb series metadata reads only this)."""
        return dcmread(BytesIO(store.read_range(relpath, offset, length, expected)))

    def _frame(
        self, store: BlobStore, relpath: str, frame: int, fmt: PixelFormat, codec_name: str
    ) -> np.ndarray:
        codec = registry.get_volume(codec_name)
        key = f"{store.spec.root}/{relpath}"
        # mapped, not read: only the prefix, the volume's header and table and the one group
        # needed are touched (a bucket serves each with a ranged GET)
        with store.mapped(relpath) as blob:
            blob.fetch(0, _PREFIX.size)
            start, length = codestream_span(bytes(blob.buffer[: _PREFIX.size]))
            blob.fetch(start, start + HEADER_SIZE)
            blob.fetch(start, start + header_length(blob.buffer[start : start + HEADER_SIZE]))
            stream = blob.buffer[start : start + length]
            try:
                header = read_header(stream)
                group = frame // header.gop_size
                with self._lock:
                    frames = self._cache.get((key, group))
                    if frames is not None:
                        self._cache.move_to_end((key, group))
                if frames is None:
                    first, end = header.group_span(group)
                    blob.fetch(start + first, start + end)
                    frames = codec.decode_frames(stream, fmt, header.group_frames(group))
                    metrics.VOLUME_FRAMES_DECODED.inc(len(frames))
                    with self._lock:
                        self._cache[(key, group)] = frames
                        while len(self._cache) > self._kept:
                            self._cache.popitem(last=False)
            finally:
                stream.release()
        return frames[frame - group * header.gop_size]
