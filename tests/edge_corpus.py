"""The edge corpus: every DICOM file shipped with pydicom and pydicom-data, sent as stored.

These are real files, many of them odd (retired SOP classes, padded or truncated pixel data,
bad values, hex UIDs, big endian, deflate): what an archive meets from real modalities. The
corpus is every ``.dcm`` file of pydicom's ``data/test_files`` and pydicom-data's data store
that pydicom reads and that has a SOP Class UID and a transfer syntax (135 files with
pydicom 3.0.2 and pydicom-data 1.0.0).

Each copy gets fresh values for the Study, Series and SOP Instance UIDs it has (a file
without one keeps lacking it: that is part of the test), and is sent with its own bytes
(pynetdicom's chunked send of a file) over its own association.
"""

from __future__ import annotations

import importlib.metadata
import random
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_context


def corpus_sources() -> list[Path]:
    """The corpus files, pydicom-data's first, sorted by name within each source."""
    dist = importlib.metadata.distribution("pydicom-data")
    external = sorted(
        Path(dist.locate_file(f))
        for f in dist.files or []
        if str(f).startswith("data_store/data/") and str(f).endswith(".dcm")
    )
    own = sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm"))
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in [*external, *own]:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if "SOPClassUID" in ds and "TransferSyntaxUID" in ds.file_meta:
                found.append(path)
    return found


@dataclass
class Sent:
    source: Path
    copy: Path | None
    sop_instance_uid: str | None
    status: int | None  # None: no status came back (association refused, send failed)
    error: str = ""


_UID_TAGS = (0x0020000D, 0x0020000E, 0x00080018)  # Study, Series, SOP Instance
_rng = random.Random()


def _fresh_like(value: bytes) -> bytes:
    """A new random UID of the same length and the same kind of characters: digits and dots
    stay digits and dots (a valid UID), any other shape (hex strings) stays that shape, so a
    file's defects survive the copy."""
    body = value.rstrip(b"\0 ")
    pad = value[len(body) :]
    if body and all(c in b"0123456789." for c in body):
        digits = "".join(_rng.choice("0123456789") for _ in range(max(0, len(body) - 6)))
        fresh = ("2.25.1" + digits)[: len(body)].encode()
    else:
        fresh = bytes(_rng.choice(b"0123456789abcdef") if c != 0x2E else c for c in body)
    return fresh + pad


def fresh_copy(src: Path, out_dir: Path) -> tuple[Path, str | None]:
    """`src` with fresh values for those of Study, Series and SOP Instance UID that it has.

    The values are overwritten in place, at the same length, so every other byte stays as
    the file has it (pydicom could not even write some of these files back). Deflated files,
    whose values sit inside the compressed stream, are written anew by pydicom instead.
    """
    out = out_dir / f"{src.parent.name}_{src.name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
            full = pydicom.dcmread(src)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                if keyword in full:
                    setattr(full, keyword, generate_uid())
            full.file_meta.MediaStorageSOPInstanceUID = full.SOPInstanceUID
            full.save_as(out)
            return out, str(full.SOPInstanceUID)
        meta, offset = split_dataset(src)
        data = bytearray(src.read_bytes())
        sop = None
        for tag in _UID_TAGS:
            if tag in ds:
                elem = ds.get_item(tag)
                at, value = elem.value_tell, _fresh_like(bytes(elem.value))
                data[at : at + len(value)] = value
                if tag == 0x00080018:
                    sop = value.rstrip(b"\0 ").decode("ascii", "replace")
        # The file meta as a sender's C-STORE request would have it: the data set's SOP
        # Class and Instance UIDs (some of these files disagree with themselves there).
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if sop is not None:
            meta.MediaStorageSOPInstanceUID = sop
        head = BytesIO()
        head.write(bytes(data[:128]) + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=False)
    out.write_bytes(head.getvalue() + bytes(data[offset:]))
    return out, sop


def send_as_stored(path: Path, port: int, ae_title: str, host: str = "127.0.0.1") -> int | None:
    """C-STORE the file's own bytes on a new association; the status, or None."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="EDGESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.requested_contexts = [
        build_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    ]
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, not pydicom's re-encoding
    try:
        assoc = ae.associate(host, port, ae_title=ae_title)
        if not assoc.is_established:
            return None
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    return int(rsp.Status) if "Status" in rsp else None


def send_corpus(out_dir: Path, port: int, ae_title: str) -> list[Sent]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for src in corpus_sources():
        try:
            copy, sop = fresh_copy(src, out_dir)
        except Exception as exc:
            results.append(Sent(src, None, None, None, f"cannot copy: {exc}"))
            continue
        try:
            status = send_as_stored(copy, port, ae_title)
            results.append(Sent(src, copy, sop, status))
        except Exception as exc:
            results.append(Sent(src, copy, sop, None, f"{type(exc).__name__}: {exc}"))
    return results
