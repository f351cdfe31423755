"""Big objects in bounded memory (issue 20 item 5): a 256 MB multi-frame object is received,
compressed, retrieved and exported without the node holding it whole.

The object is made by the test from real pixels (the 20 slices of the real TotalSegmentator
CT series, 512² 16-bit, repeated into 512 frames: 268 MB uncompressed) and sent by DCMTK
storescu, retrieved by DCMTK getscu (one, then three at once). The node process' RSS is
sampled in a thread; what is asserted is the rise over the RSS before each step (peak minus
baseline), which is memory, not wall-clock time. docs/memory.md gives the figures measured.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import peers
import psutil
import pydicom
import pytest
from nodecheck import node_stats, wait_compressed
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from compacs.codecs.base import PixelFormat, native_frames
from compacs.service.compress import compress
from compacs.service.compress_file import compress_file
from compacs.service.ingest import parse, parse_file
from compacs.service.rules import CodecChoice
from compacs.service.storage.archive import Archive, checksum
from compacs.service.validate import PIXELS, inspect

FRAMES = 512  # of 512² 16-bit: 268,435,456 bytes of pixel data
LIMIT_MB = 64  # the bound on the node's RSS rise, on receive and per C-GET
JPEG_LS = str(JPEGLSLossless)


def big_multiframe(path: Path, frames_wanted: int = FRAMES) -> tuple[Path, str]:
    """A 256 MB multi-frame CT (uncompressed, explicit VR LE) of real pixels, written frame by
    frame so that the test itself stays small; the SHA-256 of its pixel data. Smaller with
    fewer `frames_wanted` (512 KiB each)."""
    from compacs.models.training.data import ct_series_files

    slices = [pydicom.dcmread(p) for p in ct_series_files()]
    frames = [np.ascontiguousarray(s.pixel_array, dtype="<u2") for s in slices]
    ds = slices[0]
    if not ds.get("SOPClassUID"):  # its anonymiser emptied it; the file meta has it
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientID, ds.PatientName = "COMPACS-BIG", "COMPACS^BIG"
    ds.NumberOfFrames = frames_wanted
    ds.PixelRepresentation = 0
    frame_bytes = frames[0].nbytes
    ds.PixelData = bytes(2)  # a placeholder: the real value is written after the header
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    head = path.read_bytes()
    marker = b"\xe0\x7f\x10\x00OW\x00\x00" + (2).to_bytes(4, "little")
    at = head.rindex(marker)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        out.write(head[:at])
        out.write(marker[:8] + (frame_bytes * frames_wanted).to_bytes(4, "little"))
        for i in range(frames_wanted):
            frame = frames[i % len(frames)].tobytes()
            out.write(frame)
            digest.update(frame)
        out.write(head[at + len(marker) + 2 :])
    return path, digest.hexdigest()


def pixel_digest(path: Path) -> str:
    """SHA-256 of a received file's native pixel data, read frame by frame."""
    from pydicom.pixels import iter_pixels

    digest = hashlib.sha256()
    for frame in iter_pixels(path, raw=True):
        digest.update(np.ascontiguousarray(frame, dtype="<u2").tobytes())
    return digest.hexdigest()


class PeakRss:
    """The peak RSS of a process (MB), sampled in a thread every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.baseline = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> float:
        return self.proc.memory_info().rss / 1e6

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.NoSuchProcess:  # it ended (an export)
                return
            time.sleep(0.01)

    @property
    def rise(self) -> float:
        return self.peak - self.baseline


@contextmanager
def sampled(pid: int) -> Iterator[PeakRss]:
    sampler = PeakRss(pid)
    sampler._thread.start()
    try:
        yield sampler
    finally:
        sampler._stop.set()
        sampler._thread.join()


def _workers(node: peers.CompacsProcess) -> list[psutil.Process]:
    children = psutil.Process(node.pid).children()
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


def _in_parallel(calls: list[Callable[[], object]]) -> list:
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- the pieces, on small real objects: the file paths give what the in-memory ones give ---


def _compress_both(source: Path, tmp_path: Path, codecs: list[str]) -> tuple:
    """`compress` on the object in memory, and `compress_file` on its file."""
    raw = source.read_bytes()
    choices = [CodecChoice(name) for name in codecs]
    in_memory = compress(raw, pydicom.dcmread(BytesIO(raw)), choices)
    archive = Archive(tmp_path / "archive")
    with open(source, "rb") as file:
        outcome = compress_file(
            file,
            len(raw),
            choices,
            lambda produce: archive.write_stream("out.dcm", produce),
            lambda: archive.delete("out.dcm"),
        )
    written = archive.abspath("out.dcm")
    return in_memory, outcome, written.read_bytes() if written.exists() else None


@pytest.mark.parametrize("key", ["ct", "multiframe", "signed12", "cr10", "implicit"])
def test_compress_file_writes_the_bytes_compress_gives(
    samples: dict[str, Path], key: str, tmp_path: Path
) -> None:
    """Native arrivals: frames from the memory map, encoded, verified and written as they
    come give the very bytes of the in-memory path (the splice of explicit VR LE arrivals,
    pydicom's re-encoding of implicit VR ones), Basic Offset Table included."""
    in_memory, outcome, data = _compress_both(samples[key], tmp_path, ["jpegls"])
    assert in_memory.codec == outcome.codec == "jpegls", (in_memory.notes, outcome.notes)
    assert data == in_memory.data
    assert outcome.written == (len(data), checksum(data))


def test_compress_file_decodes_an_encapsulated_arrival_frame_by_frame(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    """RLE arrival, JPEG-LS rule: each fragment decoded by our codec from the file."""
    in_memory, outcome, data = _compress_both(samples["rle"], tmp_path, ["jpegls"])
    assert in_memory.codec == outcome.codec == "jpegls"
    got, expected = pydicom.dcmread(BytesIO(data)), pydicom.dcmread(BytesIO(in_memory.data))
    assert got.PixelData == expected.PixelData
    assert [e.tag for e in got] == [e.tag for e in expected]


def test_compress_file_falls_back_and_keeps_what_does_not_decode(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    """A codec that cannot take the image is passed over; pixel data that does not decode
    keeps the object as received, with the reason; nothing is left written."""
    _in_memory, outcome, data = _compress_both(samples["rgb"], tmp_path / "a", ["rle"])
    assert outcome.codec == "rle" and data is not None
    from test_export import corrupt_jpeg_ls

    _in_memory, outcome, data = _compress_both(samples["deflate"], tmp_path / "d", ["jpegls"])
    assert outcome is None and data is None  # deflated: left to the in-memory path
    bad = corrupt_jpeg_ls(tmp_path / "bad")
    in_memory, outcome, data = _compress_both(bad, tmp_path / "b", ["j2k"])
    assert in_memory.codec == outcome.codec == "passthrough" and data is None
    assert outcome.source_error and outcome.source_error.startswith("pixel data does not decode")


def test_a_spooled_data_set_is_parsed_from_its_file_as_from_memory(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    """parse_file and parse agree on the data set and its defects, pixel data never read;
    a data set cut short in its pixel data is a PIXELS defect either way."""
    for key in ("multiframe", "jpeg_ls", "ct", "deflate"):  # deflate: parsed in memory
        raw = samples[key].read_bytes()
        for data in (raw, raw[:-1000]) if key != "deflate" else (raw,):
            path = tmp_path / f"{key}.dcm"
            path.write_bytes(data)
            in_memory, memory_defects = parse(data)
            from_file, file_defects, extent = parse_file(path)
            sop_class, sop = str(in_memory.SOPClassUID), str(in_memory.SOPInstanceUID)
            memory_defects += inspect(in_memory, sop_class, sop)
            file_defects += inspect(from_file, sop_class, sop, extent)
            assert from_file.SOPInstanceUID == sop
            if extent is not None:
                assert from_file._dict[0x7FE00010].value is None  # located, never read
            assert [d.kind for d in file_defects] == [d.kind for d in memory_defects], key
            assert (PIXELS in {d.kind for d in file_defects}) == (data is not raw), key


def test_native_frames_are_the_frames_pydicom_gives(samples: dict[str, Path]) -> None:
    """Bits above BitsStored normalised as pydicom does: masked, or sign-extended."""
    from pydicom.pixels import iter_pixels

    for key in ("multiframe", "signed12", "ct", "cr15"):
        ds = pydicom.dcmread(samples[key])
        fmt = PixelFormat.from_dataset(ds)
        raw = bytearray(ds.PixelData)
        raw[1::2] = bytes(b | 0xF0 for b in raw[1::2])  # garbage above BitsStored
        ds.PixelData = bytes(raw)
        frames = list(native_frames(memoryview(raw), 0, fmt))
        expected = list(iter_pixels(ds, raw=True))
        assert len(frames) == len(expected) == fmt.number_of_frames
        for got, want in zip(frames, expected, strict=True):
            assert got.dtype == want.dtype and np.array_equal(got, want), key


@pytest.mark.peers
@pytest.mark.slow
def test_a_256_mb_object_in_bounded_memory(make_node, make_storescp, tmp_path: Path) -> None:
    """Receive (storescu), compress (a worker), retrieve (getscu: 1, then 3 at once; movescu
    to storescp) and export a 256 MB multi-frame object: the node's RSS rises by less than
    64 MB on receive and per concurrent C-GET or C-MOVE, a worker's and the export's peak
    stay under the object's size."""
    src, pixels = big_multiframe(tmp_path / "big.dcm")
    size_mb = src.stat().st_size / 1e6
    storescp = make_storescp()
    node = make_node(f'[move_destinations]\nSTORESCP = "127.0.0.1:{storescp.port}"\n')
    time.sleep(2)  # the worker pool's warm-up is over: a steady baseline
    with ExitStack() as stack:
        workers = [stack.enter_context(sampled(w.pid)) for w in _workers(node)]
        assert workers, "no compression workers found"
        with sampled(node.pid) as receive:
            res = node.store([src])
            assert peers.store_ok(res, [src]), res.stdout[-3000:]
        stats = wait_compressed(node, 1, timeout=900)
    worker_rise = max(w.rise for w in workers)
    print(
        f"object {size_mb:.0f} MB; receive: node RSS +{receive.rise:.1f} MB "
        f"(baseline {receive.baseline:.0f} MB); worker RSS +{worker_rise:.1f} MB "
        f"(baseline {max(w.baseline for w in workers):.0f} MB)"
    )
    assert stats["by_codec"]["jpegls"]["instances"] == 1, stats
    assert receive.rise < LIMIT_MB, receive.rise
    assert worker_rise < size_mb, worker_rise

    def get(i: int) -> Callable[[], object]:
        out = tmp_path / f"get{i}"
        return lambda: (
            out,
            peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, out, timeout=900),
        )

    study = str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)
    for concurrent in (1, 3):
        with sampled(node.pid) as retrieve:
            results = _in_parallel([get(i + 10 * concurrent) for i in range(concurrent)])
        print(
            f"{concurrent} C-GET(s) at once: node RSS +{retrieve.rise:.1f} MB "
            f"(baseline {retrieve.baseline:.0f} MB)"
        )
        for out, res in results:
            assert res.returncode == 0, res.stdout[-3000:]
            (got,) = list(out.glob("*"))
            assert pixel_digest(got) == pixels
        assert retrieve.rise < LIMIT_MB * concurrent, retrieve.rise

    with sampled(node.pid) as move:  # storescp takes JPEG-LS: the stored bytes, streamed
        res = peers.movescu(node.port, "STUDY", {"StudyInstanceUID": study}, "STORESCP")
    print(f"C-MOVE: node RSS +{move.rise:.1f} MB (baseline {move.baseline:.0f} MB)")
    assert res.returncode == 0, res.stdout[-3000:]
    (moved,) = storescp.received()
    assert peers.transfer_syntax_of(moved) == JPEG_LS
    assert pixel_digest(moved) == pixels
    assert move.rise < LIMIT_MB, move.rise

    out = tmp_path / "export"  # explicit VR little endian: decoded frame by frame
    export = subprocess.Popen(
        [sys.executable, "-m", "compacs.service.cli", "export", "--data", str(node.data_dir)]
        + ["--all", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=node.environment(),
    )
    with sampled(export.pid) as exporting:
        output, _ = export.communicate(timeout=900)
    print(f"export: peak RSS {exporting.peak:.0f} MB")
    assert export.returncode == 0, output[-3000:]
    (exported,) = list(out.rglob("*.dcm"))
    assert peers.transfer_syntax_of(exported) == ExplicitVRLittleEndian
    assert pixel_digest(exported) == pixels
    assert exporting.peak < size_mb, exporting.peak
    assert node_stats(node)["instances"] == 1
