"""A volume codec (the kind cold tiers use) on files a user gives: encode a multi-frame
image or a folder of one series, and say which volume codecs could take an image and why
not. `compacs codec encode` and `compacs rules explain` call these; they sit beside the
tier code because a series volume is what a tier move writes (volumes.pack)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.codecs.volume import encode_verified
from compacs.service.compress import part10, source_frames, with_frames
from compacs.service.tiering import recompress, volumes


class VolumeInputError(ValueError):
    """Files a volume codec cannot take; the message says which and why."""


@dataclass(frozen=True)
class Encoded:
    frames: int
    bytes_received: int  # the source files' sizes
    bytes_written: int


def encode_file(codec: Any, params: dict[str, Any], source: Path, output: Path) -> Encoded:
    """A volume codec on a multi-frame file (out: a Part-10 file in its private syntax, which
    `codec decode` reads back) or on a folder holding one series (out: a series volume blob,
    the form a cold tier keeps it in); verified bit-exact either way."""
    paths = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    datasets = [_read(p) for p in paths]
    if not datasets or any("PixelData" not in ds for ds in datasets):
        raise VolumeInputError(
            f"{source}: give a multi-frame image, or a folder of one series' slices"
        )
    received = sum(p.stat().st_size for p in paths)
    if len(datasets) == 1:
        frames = source_frames(datasets[0])
    else:
        if len({str(ds.SeriesInstanceUID) for ds in datasets}) != 1:
            raise VolumeInputError(f"{source}: the files are of more than one series")
        order = recompress.slice_order(datasets)
        datasets = [datasets[i] for i in order]
        frames = [f for ds in datasets for f in source_frames(ds)]
    fmt = PixelFormat.from_dataset(datasets[0])
    reason = codec.unsupported_reason(fmt) or codec.data_unsupported_reason(frames, fmt)
    if len(frames) < 2:
        reason = "a single frame: a volume codec needs a multi-frame image or a series"
    if reason:
        raise VolumeInputError(f"{source}: {codec.name} does not take it: {reason}")
    stream = encode_verified(codec, frames, fmt, **params)
    if len(datasets) == 1:
        data = part10(with_frames(datasets[0], codec, [stream], fmt))
    else:
        data, _spans = volumes.pack(stream, [volumes.header_of(ds) for ds in datasets])
    output.write_bytes(data)
    return Encoded(len(frames), received, len(data))


def explain(ds: Dataset, fmt: PixelFormat) -> list[str]:
    """For a multi-frame image: whether each volume codec (for tiers) could take it, and why
    not (a value span its bit depths cannot hold, a geometry it refuses)."""
    lines = ["volume codecs (for [[tiers]]), on its frames:"]
    try:
        frames = source_frames(ds)
    except Exception as exc:
        return [*lines, f"  its pixel data does not decode: {exc}"]
    for name in registry.volume_names():
        codec = registry.get_volume(name)
        reason = (
            f"not available: {codec.unavailable_reason()}"
            if not codec.is_available()
            else codec.unsupported_reason(fmt) or codec.data_unsupported_reason(frames, fmt)
        )
        lines.append(f"  {name}: {'does not qualify: ' + reason if reason else 'qualifies'}")
    return lines


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise VolumeInputError(f"{path}: cannot read a DICOM file: {exc}") from exc
