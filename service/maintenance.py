"""Offline jobs on a node's data folder: export, verify, stats.

They open the index and archive directly (no network), so an administrator can run them
while the node is stopped, or beside it: reads never block the node's writer (SQLite WAL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from tqdm import tqdm

from compacs.service.compress import source_frames
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Index, Instance
from compacs.service.transcode import transcode

log = logging.getLogger("compacs.maintenance")


@dataclass
class Store:
    """A node's data folder opened for offline work."""

    archive: Archive
    index: Index

    @classmethod
    def open(cls, data_dir: Path, index_url: str) -> Store:
        if not (data_dir / "archive").is_dir():
            raise FileNotFoundError(
                f"{data_dir}: no compacs archive here (expected {data_dir / 'archive'}); "
                "give the --data folder that `compacs serve` used"
            )
        return cls(Archive(data_dir / "archive"), Index.open(index_url))


def export(
    store: Store, instances: list[Instance], out_dir: Path, target: str, progress: bool = True
) -> list[Path]:
    """Write each instance as a Part-10 file <out>/<study>/<series>/<sop>.dcm in `target`.

    File names are UIDs, which the node only accepts in digits-and-dots form.
    """
    written = []
    for inst in tqdm(instances, desc="export", unit="obj", disable=not progress):
        data = store.archive.read(inst.blob_path, inst.checksum)
        data = transcode(data, target)
        series = inst.series
        path = (
            out_dir
            / series.study.study_instance_uid
            / series.series_instance_uid
            / f"{inst.sop_instance_uid}.dcm"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def verify(store: Store, progress: bool = True) -> list[str]:
    """Every problem found: bad checksums, undecodable blobs, missing blobs, orphans."""
    failures: list[str] = []
    instances = store.index.instances()
    referenced = set()
    for inst in tqdm(instances, desc="verify", unit="obj", disable=not progress):
        referenced.add(inst.blob_path)
        where = f"SOP {inst.sop_instance_uid} ({inst.blob_path})"
        try:
            data = store.archive.read(inst.blob_path, inst.checksum)
        except FileNotFoundError:
            failures.append(f"{where}: blob missing")
            continue
        except OSError as exc:
            failures.append(f"{where}: {exc}")
            continue
        try:
            ds = dcmread(BytesIO(data))
            if "PixelData" in ds:
                source_frames(ds)
        except Exception as exc:
            failures.append(f"{where}: does not decode: {exc}")
    failures.extend(
        f"orphan blob {path}: on disk but in no index row" for path in _orphans(store, referenced)
    )
    return failures


def _orphans(store: Store, referenced: set[str]) -> Iterable[str]:
    return (p for p in store.archive.all_blobs() if p not in referenced)
