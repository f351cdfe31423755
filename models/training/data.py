"""The real images that the registries carry, fetched once into a local cache.

Why here: training, the codec benchmarks and the volume tests all need the same real series,
and nothing may be committed as a data set. PyPI is the only source these machines reach,
so a real 20-slice CT series comes from the source package of TotalSegmentator 2.18.0
(`tests/reference_files/example_ct_dicom`, JPEG 2000 lossless), fetched with
`pip download` into `$COMPACS_DATA_CACHE` (default `~/.cache/compacs`). The same package has
resampled CT and MR NIfTI volumes, the nibabel wheel has Siemens MR DICOM files and a small
fMRI volume, and pydicom / pydicom-data have CT, MR, CR, NM and US images: `all_images()`
gathers them all and `split()` divides them by patient or series for the learned codec.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOTALSEGMENTATOR = "totalsegmentator==2.18.0"
_REFERENCE_PREFIX = "tests/reference_files/"


class DataUnavailable(RuntimeError):
    """The real data could not be fetched (no registry reachable); the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("COMPACS_DATA_CACHE") or Path.home() / ".cache" / "compacs")


def _pip_download(requirement: str, pattern: str, kind: str) -> Path:
    """The package file matching `pattern` in the cache, fetched with pip first if missing.

    `kind` is pip's `--no-binary` (an sdist) or `--only-binary` (a wheel)."""
    download = cache_dir() / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    found = next(download.glob(pattern), None)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", kind, ":all:"]
        res = subprocess.run(
            [*cmd, requirement, "-d", str(download)], capture_output=True, text=True
        )
        found = next(download.glob(pattern), None)
        if res.returncode != 0 or found is None:
            raise DataUnavailable(
                f"pip download {requirement} failed ({res.stderr.strip()[-300:]}); "
                f"it needs PyPI, or put {pattern} in {download}"
            )
    return found


def totalsegmentator_reference_files() -> Path:
    """`tests/reference_files/` of the TotalSegmentator source package, downloaded on first use."""
    target = cache_dir() / "totalsegmentator-2.18.0" / "reference_files"
    done = target / ".complete"
    if done.exists():
        return target
    archive = _pip_download(TOTALSEGMENTATOR, "totalsegmentator-2.18.0.tar.gz", "--no-binary")
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


# --- every real source, and the split -------------------------------------------------------

NIBABEL = "nibabel==5.4.2"


def nibabel_test_data() -> Path:
    """The test data of the nibabel wheel (Siemens MR DICOM, small fMRI NIfTI), fetched once."""
    target = cache_dir() / "nibabel-5.4.2"
    done = target / ".complete"
    if done.exists():
        return target
    wheel = _pip_download(NIBABEL, "nibabel-5.4.2-*.whl", "--only-binary")
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if "/tests/data/" in name and name.endswith((".dcm", ".dcm.gz", ".nii", ".nii.gz")):
                zf.extract(name, target)
    done.touch()
    return target


@dataclass(frozen=True)
class RealImage:
    """One real 2-D image as stored (integers), with what the split and the tables need."""

    source: str  # file, and frame or slice
    modality: str  # CT, MR, CR, ...
    group: str  # patient or series: the unit of the split
    pixels: np.ndarray  # (rows, columns) int32, stored values
    bits_stored: int
    signed: bool


def _dicom_images(path: Path | str, modality: str, group: str, label: str) -> list[RealImage]:
    import pydicom
    from pydicom.pixels import iter_pixels

    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    ds = pydicom.dcmread(io.BytesIO(raw))
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    return [
        RealImage(f"{label}[{i}]", modality, group, frame.astype(np.int32), bits, signed)
        for i, frame in enumerate(iter_pixels(ds, raw=True))
    ]


def read_nifti(path: Path) -> np.ndarray:
    """The stored integers of an integer NIfTI-1 volume, shape (z, y, x) (or (t, z, y, x)).

    A small reader instead of nibabel: it needs only the header fields that say the layout,
    and the stored values are what the codec codes (scl_slope/inter are ignored on purpose).
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if struct.unpack("<i", raw[:4])[0] != 348:
        raise ValueError(f"{path} is not a little-endian NIfTI-1 file")
    dim = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    offset = int(struct.unpack("<f", raw[108:112])[0])
    dtypes = {2: "u1", 4: "<i2", 8: "<i4", 256: "i1", 512: "<u2"}
    if datatype not in dtypes:
        raise ValueError(f"{path}: NIfTI datatype {datatype} is not an integer type")
    shape = dim[1 : dim[0] + 1]
    count = int(np.prod(shape))
    data = np.frombuffer(raw, dtype=dtypes[datatype], count=count, offset=offset)
    return data.reshape(shape[::-1])  # NIfTI is x-fastest


def _nifti_images(path: Path, modality: str, group: str, label: str) -> list[RealImage]:
    vol = read_nifti(path).astype(np.int32)
    vol = vol.reshape(-1, *vol.shape[-2:])
    signed = bool(vol.min() < 0)
    span = int(vol.max()) - int(vol.min())
    bits = max(2, int(span).bit_length() + int(signed))
    return [
        RealImage(f"{label}[{i}]", modality, group, vol[i], bits, signed) for i in range(len(vol))
    ]


def _pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if not found:
        raise DataUnavailable(f"{name} is in neither pydicom's test files nor pydicom-data")
    return str(found)


# (file, modality, group): pydicom's own test files and pydicom-data. Files that were decoded
# from lossy J2K (693_UNCR, MR2_UNCR) are replaced by their reversible originals.
PYDICOM_SOURCES = [
    ("693_J2KR.dcm", "CT", "CQ500-CT-310"),
    ("CT_small.dcm", "CT", "1CT1"),
    ("explicit_VR-UN.dcm", "CT", "PANCREAS_0001"),
    ("J2K_pixelrep_mismatch.dcm", "CT", "JXD191021006"),
    ("eCT_Supplemental.dcm", "CT", "eCT-0010"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", "MR", "021234567"),
    ("examples_overlay.dcm", "MR", "021234567"),
    ("MR_small.dcm", "MR", "4MR1"),
    ("emri_small.dcm", "MR", "emri"),
    ("MR2_J2KR.dcm", "MR", "5MR2"),
    ("RG1_J2KR.dcm", "CR", "9RG1"),
    ("RG3_J2KR.dcm", "CR", "11RG3"),
    ("JPEG2000_UNC.dcm", "NM", "8NM1"),
    ("gdcm-US-ALOKA-16.dcm", "US", "98279"),
]
NIBABEL_SOURCES = [
    ("nibabel/tests/data/0.dcm", "MR", "nibabel-siemens-9190"),
    ("nibabel/tests/data/1.dcm", "MR", "nibabel-siemens-9190"),
    ("nibabel/nicom/tests/data/slicethickness_empty_string.dcm", "MR", "nibabel-st"),
    ("nibabel/nicom/tests/data/decimal_rescale.dcm", "MR", "nibabel-decimal"),
    ("nibabel/nicom/tests/data/siemens_dwi_0.dcm.gz", "MR", "nibabel-siemens-9190"),
    ("nibabel/nicom/tests/data/siemens_dwi_1000.dcm.gz", "MR", "nibabel-siemens-9190"),
    ("nibabel/nicom/tests/data/philips_mprage.dcm.gz", "MR", "nibabel-mprage"),
    ("nibabel/tests/data/example4d.nii.gz", "MR", "nibabel-example4d"),
]
# TotalSegmentator's NIfTI volumes (resampled, integer HU): two CT subjects and one MR. The
# cropped copies in the report folders repeat the 1.5 mm subject and are left out.
TOTALSEG_NIFTI = [
    ("example_ct.nii.gz", "CT", "totalseg-ct-3mm"),
    ("aorta_report/example_ct.nii.gz", "CT", "totalseg-ct-1.5mm"),
    ("example_mr_sm.nii.gz", "MR", "totalseg-mr"),
]
TOTALSEG_SERIES_GROUP = "totalseg-ct-dicom"

# The split, by patient or series. Held out (never trained on, what bench/learned.py and the
# model card report): the 20-slice TotalSegmentator CT series, the Philips 1024² MR, the
# 10-frame MR and the 64² Toshiba MR, and the 15-bit Philips CR. Validation (watched during
# training, never reported as a result): one CT patient and one MR patient.
HELD_OUT_GROUPS = frozenset({TOTALSEG_SERIES_GROUP, "5MR2", "emri", "4MR1", "9RG1"})
VALIDATION_GROUPS = frozenset({"CQ500-CT-310", "021234567"})


def all_images() -> list[RealImage]:
    """Every real single-channel 10-16-bit image the registries carry, one entry per 2-D image."""
    images: list[RealImage] = []
    for i, path in enumerate(ct_series_files()):
        images += _dicom_images(path, "CT", TOTALSEG_SERIES_GROUP, f"totalseg-ct-dicom/{i:02d}")
    for name, modality, group in PYDICOM_SOURCES:
        images += _dicom_images(_pydicom_file(name), modality, group, name)
    nib = nibabel_test_data()
    for rel, modality, group in NIBABEL_SOURCES:
        path = nib / rel
        load = _nifti_images if rel.endswith((".nii", ".nii.gz")) else _dicom_images
        images += load(path, modality, group, rel.rsplit("/", 1)[-1])
    ref = totalsegmentator_reference_files()
    for rel, modality, group in TOTALSEG_NIFTI:
        images += _nifti_images(ref / rel, modality, group, f"totalseg/{rel}")
    # Some anonymised test files carry blanked (constant) pixels: nothing to learn or measure.
    return [im for im in images if im.pixels.max() > im.pixels.min()]


def pack(images: list[RealImage], path: Path) -> None:
    """Write images to one compressed .npz that `unpack` reads back exactly.

    Why: a lent GPU machine reaches no registry and has no pydicom, so a training run there
    reads the images from this file (16 MB for the training and validation sets), carried
    with the working tree. Pixels keep their stored integers in the narrowest dtype that
    holds them.
    """
    arrays: dict[str, np.ndarray] = {}
    for i, im in enumerate(images):
        lo, hi = int(im.pixels.min()), int(im.pixels.max())
        dtype = next(
            t
            for t in (np.int16, np.uint16, np.int32)
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max
        )
        arrays[f"pixels{i}"] = im.pixels.astype(dtype)
    arrays["meta"] = np.array(
        [
            [im.source, im.modality, im.group, str(im.bits_stored), str(int(im.signed))]
            for im in images
        ],
        dtype=str,
    ).reshape(len(images), 5)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def unpack(path: Path) -> list[RealImage]:
    """The images that `pack` wrote to `path`."""
    with np.load(path) as z:
        return [
            RealImage(
                source, modality, group, z[f"pixels{i}"].astype(np.int32), int(bits), signed == "1"
            )
            for i, (source, modality, group, bits, signed) in enumerate(z["meta"])
        ]


def split(images: list[RealImage]) -> dict[str, list[RealImage]]:
    """train / validation / held_out, by group (patient or series), never by image."""
    out: dict[str, list[RealImage]] = {"train": [], "validation": [], "held_out": []}
    for image in images:
        if image.group in HELD_OUT_GROUPS:
            out["held_out"].append(image)
        elif image.group in VALIDATION_GROUPS:
            out["validation"].append(image)
        else:
            out["train"].append(image)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m compacs.models.training.data",
        description="Pack the training and validation images (never the held-out ones) into one "
        "file, for `python -m compacs.models.training.train --images FILE` on a machine with no "
        "registry.",
    )
    parser.add_argument("out", type=Path, help="the .npz file to write")
    args = parser.parse_args(argv)
    parts = split(all_images())
    images = parts["train"] + parts["validation"]
    pack(images, args.out)
    pixels = sum(im.pixels.size for im in images)
    print(
        f"wrote {args.out}: {len(images)} images, {pixels / 1e6:.2f} M pixels, "
        f"{args.out.stat().st_size / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
