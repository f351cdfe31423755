"""Test inputs made from REAL images (pydicom's test files and pydicom-data, and the real
series that `compacs.models.training.data` fetches).

Every file written here gets fresh Study/Series/SOP Instance UIDs: Orthanc answers a
duplicate SOP Instance UID with Success without storing it, and many of pydicom's files
share one UID, so untouched copies would make store/retrieve tests lie.
Synthetic pixels are never used: ratios and codec paths must see real data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from compacs.codecs.base import PixelFormat
from compacs.models.training.data import (
    ct_series_files,
    read_nifti,
    totalsegmentator_reference_files,
)

# Real 512x512 signed 16-bit CT slice, J2K reversible (693_UNCR was decoded from lossy J2K).
CT_SERIES_SOURCE = "693_J2KR.dcm"

# key -> pydicom test file; what each key stands for in the integration tests.
SAMPLE_SOURCES: dict[str, str] = {
    "ct": "CT_small.dcm",  # CT 128², signed 16-bit, explicit VR LE
    "mr": "MR_small.dcm",  # MR 64², signed 16-bit
    "cr15": "RG1_UNCR.dcm",  # CR 1955x1841, 15 bits stored, MONOCHROME1
    "cr10": "RG3_UNCR.dcm",  # CR 1760², 10 bits stored
    "multiframe": "emri_small.dcm",  # enhanced MR, 10 frames, 12 bits stored
    "rgb": "SC_rgb.dcm",  # secondary capture RGB 8-bit
    "us_rgb": "US1_UNCR.dcm",  # ultrasound RGB 640x480
    "jpeg_ls": "emri_small_jpeg_ls_lossless.dcm",  # already compressed, .4.80
    "j2k": "MR2_J2KR.dcm",  # MR 1024², J2K lossless .4.90
    "rle": "emri_small_RLE.dcm",  # RLE .5, 10 frames
    "jpeg_lossy": "SC_rgb_jpeg_lossy_gdcm.dcm",  # JPEG baseline .4.50, YBR_FULL
    "jpeg_lossless": "JPEG-LL.dcm",  # JPEG lossless SV1 .4.70, 16-bit NM
    "implicit": "MR_small_implicit.dcm",  # implicit VR little endian
    "big_endian": "MR_small_bigendian.dcm",  # explicit VR big endian (retired TS)
    "deflate": "image_dfl.dcm",  # deflated explicit VR LE
}


def testdata_path(name: str) -> Path:
    """Path of a pydicom / pydicom-data test file; FileNotFoundError names what is missing."""
    found = get_testdata_file(name)
    if not found:
        raise FileNotFoundError(f"{name} is in neither pydicom's test files nor pydicom-data")
    return Path(found)


def _refresh_uids(ds: Dataset, study_uid: str | None = None, series_uid: str | None = None) -> None:
    """New Study/Series/SOP Instance UIDs (meta header kept in step)."""
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _apply(ds: Dataset, overrides: Mapping[str, Any]) -> None:
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in overrides and getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _short(uid: str) -> str:
    return uid.replace(".", "")[-10:]


@functools.lru_cache(maxsize=1)
def ct_slice_pixels() -> np.ndarray:
    """The decoded pixels of the real CT slice (int16, 512x512), decoded once per process."""
    ds = pydicom.dcmread(testdata_path(CT_SERIES_SOURCE))
    arr = ds.pixel_array
    arr.setflags(write=False)
    return arr


def _ct_template() -> Dataset:
    """The CT slice as an uncompressed explicit VR little endian dataset."""
    ds = pydicom.dcmread(testdata_path(CT_SERIES_SOURCE))
    arr = ct_slice_pixels()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = arr.astype("<i2" if ds.PixelRepresentation else "<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds["PixelData"].is_undefined_length = False
    ds.PatientName = "COMPACS^CTSERIES"
    ds.PatientID = "COMPACS-CT"
    return ds


def ct_series(
    out_dir: Path | str,
    n: int,
    study_uid: str | None = None,
    *,
    series_uid: str | None = None,
    prefix: str = "ct",
    **overrides: Any,
) -> list[Path]:
    """n Part-10 CT files (real 512² slice, uncompressed explicit VR LE) of one series.

    One study and series for the batch, distinct SOP Instance UIDs, InstanceNumber 1..n
    and increasing slice positions. Fast for n=500: the dataset is built once and only
    the per-instance attributes change between writes. ``overrides`` set DICOM keywords
    on all files (e.g. ``PatientID="P1"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = _ct_template()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    _apply(ds, overrides)
    x, y, z0 = (float(v) for v in ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
    step = float(ds.get("SliceThickness", 1.0) or 1.0)
    tag = _short(ds.SeriesInstanceUID)
    paths = []
    for i in range(1, n + 1):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i
        z = z0 + (i - 1) * step
        ds.ImagePositionPatient = [x, y, round(z, 4)]
        ds.SliceLocation = round(z, 4)
        path = out / f"{prefix}_{tag}_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def fresh_copy(
    src: Path | str, out_dir: Path | str, name: str | None = None, **overrides: Any
) -> Path:
    """Copy a DICOM file (a path, or a pydicom test-file name) with fresh UIDs.

    The transfer syntax and pixel data bytes are kept as they are. ``overrides`` set DICOM
    keywords, e.g. ``StudyInstanceUID=...`` to put several copies in one study.
    """
    path = Path(src) if Path(src).exists() else testdata_path(str(src))
    ds = pydicom.dcmread(path)
    _refresh_uids(ds)
    _apply(ds, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / (name or f"{path.stem}_{_short(ds.SOPInstanceUID)}.dcm")
    ds.save_as(target, enforce_file_format=True)
    return target


def signed_ct_12bit(out_dir: Path | str, *, sign_extend: bool = True, **overrides: Any) -> Path:
    """A real CT (CT_small) stored as signed 16-bit with BitsStored 12, HighBit 11.

    Values are converted to Hounsfield units (stored + intercept, intercept 0 afterwards),
    so air and fat really are negative, and clipped into -2048..2047. With
    ``sign_extend=False`` the 4 unused high bits are zeroed instead of sign-extended (allowed
    by DICOM, seen from some modalities; a decoder must mask and sign-extend itself).
    """
    ds = pydicom.dcmread(testdata_path("CT_small.dcm"))
    arr = ds.pixel_array.astype(np.int32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = np.rint(arr * slope + intercept).astype(np.int32)
    hu = np.clip(hu, -2048, 2047).astype(np.int16)
    assert hu.min() < 0 < hu.max(), "the slice should hold negative and positive HU"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    if "PixelPaddingValue" in ds:
        ds.PixelPaddingValue = -2048
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if kw in ds:
            del ds[kw]
    raw = hu.astype("<i2")
    if not sign_extend:
        raw = (raw.view("<u2") & 0x0FFF).astype("<u2")
    ds.PixelData = raw.tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _refresh_uids(ds)
    _apply(ds, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if sign_extend else "_zerohigh"
    target = out / f"ct_signed12{suffix}_{_short(ds.SOPInstanceUID)}.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


def signed_ct_12bit_values() -> np.ndarray:
    """The HU values :func:`signed_ct_12bit` stores, for exact comparisons in tests."""
    ds = pydicom.dcmread(testdata_path("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip(np.rint(hu), -2048, 2047).astype(np.int16)


def sample_files(out_dir: Path | str, keys: list[str] | None = None) -> dict[str, Path]:
    """Fresh-UID copies of real files covering the formats compacs must handle.

    Keys: those of SAMPLE_SOURCES plus ``signed12`` (see signed_ct_12bit). A missing
    source file raises, so a broken pydicom-data install is not mistaken for a pass.
    """
    out = Path(out_dir)
    wanted = keys or [*SAMPLE_SOURCES, "signed12"]
    files: dict[str, Path] = {}
    for key in wanted:
        if key == "signed12":
            files[key] = signed_ct_12bit(out)
        else:
            files[key] = fresh_copy(SAMPLE_SOURCES[key], out, name=f"{key}.dcm")
    return files


def read_pixels(path: Path | str) -> np.ndarray:
    """Decoded pixels of a file, for bit-exact comparisons after a round trip."""
    return pydicom.dcmread(path).pixel_array


# --- real volumes, in the frame convention of codecs/base.py (volume codecs, bench/codecs.py)

Volume = tuple[PixelFormat, tuple[np.ndarray, ...]]


def frames_of(ds: Dataset, indices: range | None = None) -> tuple[np.ndarray, ...]:
    """The frames of a dataset as codecs see them (`iter_pixels(raw=True)`); compressed data
    through pylibjpeg, since gdcm mis-decodes signed data with BitsStored < BitsAllocated."""
    plugin = "pylibjpeg" if ds.file_meta.TransferSyntaxUID.is_compressed else ""
    pixels = iter_pixels(ds, raw=True, decoding_plugin=plugin, indices=indices)
    return tuple(np.ascontiguousarray(frame) for frame in pixels)


def pydicom_volume(name: str, frames: int | None = None) -> Volume:
    """A pydicom / pydicom-data file's pixel format and (its first `frames`) frames.

    JPEG-baseline YBR_FULL_422 cines decode to full-resolution YBR samples: the format then
    says YBR_FULL, which is what the frames hold.
    """
    ds = pydicom.dcmread(testdata_path(name))
    fmt = PixelFormat.from_dataset(ds)
    if fmt.photometric_interpretation == "YBR_FULL_422":
        fmt = dataclasses.replace(fmt, photometric_interpretation="YBR_FULL")
    return fmt, frames_of(ds, range(frames) if frames else None)


def ct_series_volume() -> Volume:
    """The 20-slice TotalSegmentator CT series (512², unsigned 12 of 16 bits), slice order."""
    slices = [pydicom.dcmread(path) for path in ct_series_files()]
    return PixelFormat.from_dataset(slices[0]), tuple(f for ds in slices for f in frames_of(ds))


def mr_series_volume() -> Volume:
    """TotalSegmentator's MR volume (20 × 91 × 117, signed 16-bit, a resampled NIfTI): the only
    real MR series the registries carry, as 20 slices."""
    vol = read_nifti(totalsegmentator_reference_files() / "example_mr_sm.nii.gz")
    fmt = PixelFormat(
        rows=vol.shape[1],
        columns=vol.shape[2],
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=16,
        pixel_representation=1,
        photometric_interpretation="MONOCHROME2",
    )
    return fmt, tuple(np.ascontiguousarray(s, dtype="<i2") for s in vol)


# --- real volumes as DICOM files to store (tiering tests) ------------------------------


def real_ct_series(out_dir: Path | str) -> list[Path]:
    """The 20 slices of the real TotalSegmentator CT series (JPEG 2000 lossless, as
    received from its scanner's export), with fresh UIDs: one study, one series."""
    study, series = generate_uid(), generate_uid()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, src in enumerate(ct_series_files()):
        ds = pydicom.dcmread(src)
        if not ds.get("SOPClassUID"):  # its anonymiser emptied it; the file meta has it
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        _refresh_uids(ds, study, series)
        path = out / f"ct_real_{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def real_mr_series(out_dir: Path | str) -> list[Path]:
    """TotalSegmentator's real MR volume (20 slices of 91 × 117, signed 16-bit) as 20 MR
    slices in one series, uncompressed (the wrapper is MR_small's; the pixels are real)."""
    fmt, frames = mr_series_volume()
    template = pydicom.dcmread(testdata_path("MR_small.dcm"))
    study, series = generate_uid(), generate_uid()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        ds = pydicom.dcmread(testdata_path("MR_small.dcm"))
        _refresh_uids(ds, study, series)
        ds.Rows, ds.Columns = fmt.rows, fmt.columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = template.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
        ds.ImagePositionPatient = [0, 0, float(i) * 5]
        ds.SliceLocation = float(i) * 5
        ds.PixelData = np.ascontiguousarray(frame, dtype="<i2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for kw in (
            "SmallestImagePixelValue",
            "LargestImagePixelValue",
            "WindowCenter",
            "WindowWidth",
        ):
            if kw in ds:
                del ds[kw]
        path = out / f"mr_real_{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def real_us_cine(out_dir: Path | str, frames: int = 30) -> Path:
    """A real ultrasound cine (pydicom-data's color3d_jpeg_baseline.dcm, 480 × 640) decoded
    once from its JPEG baseline to uncompressed YBR_FULL frames, as a multi-frame US object."""
    src = pydicom.dcmread(testdata_path("color3d_jpeg_baseline.dcm"))
    pixels = np.stack(frames_of(src, range(frames)))
    ds = pydicom.dcmread(testdata_path("color3d_jpeg_baseline.dcm"), stop_before_pixels=True)
    _refresh_uids(ds)
    ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PlanarConfiguration = 0
    for kw in (
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    ):
        if kw in ds:
            del ds[kw]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "us_cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
