"""The real images that the registries carry, fetched once into a local cache.

Why here: training, the codec benchmarks and the volume tests all need the same real series,
and nothing may be committed as a data set. PyPI is the only source these machines reach,
so a real 20-slice CT series comes from the source package of TotalSegmentator 2.18.0
(`tests/reference_files/example_ct_dicom`, JPEG 2000 lossless), fetched with
`pip download` into `$COMPACS_DATA_CACHE` (default `~/.cache/compacs`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

TOTALSEGMENTATOR = "totalsegmentator==2.18.0"
_REFERENCE_PREFIX = "tests/reference_files/"


class DataUnavailable(RuntimeError):
    """The real data could not be fetched (no registry reachable); the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("COMPACS_DATA_CACHE") or Path.home() / ".cache" / "compacs")


def totalsegmentator_reference_files() -> Path:
    """`tests/reference_files/` of the TotalSegmentator source package, downloaded on first use."""
    target = cache_dir() / "totalsegmentator-2.18.0" / "reference_files"
    done = target / ".complete"
    if done.exists():
        return target
    download = cache_dir() / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    archive = next(download.glob("totalsegmentator-2.18.0.tar.gz"), None)
    if archive is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        res = subprocess.run(
            [*cmd, TOTALSEGMENTATOR, "-d", str(download)], capture_output=True, text=True
        )
        archive = next(download.glob("totalsegmentator-2.18.0.tar.gz"), None)
        if res.returncode != 0 or archive is None:
            raise DataUnavailable(
                f"pip download {TOTALSEGMENTATOR} failed ({res.stderr.strip()[-300:]}); "
                "it needs PyPI, or put the sdist in " + str(download)
            )
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if member.isfile() and name.startswith(_REFERENCE_PREFIX):
                member.name = name[len(_REFERENCE_PREFIX) :]
                tar.extract(member, target, filter="data")
    done.touch()
    return target


def ct_series_files() -> list[Path]:
    """The 20 slices of the real CT series (512², signed, JPEG 2000 lossless), in slice order."""
    import pydicom

    folder = totalsegmentator_reference_files() / "example_ct_dicom"
    files = [p for p in folder.iterdir() if p.is_file()]
    position = {
        p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files
    }
    return sorted(files, key=position.__getitem__)
