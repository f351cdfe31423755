"""The learned codec over a volume (`learnvol`): each slice predicted by the shipped network and
corrected from the slices before it (models/interslice.py). On real series only.

What must hold: round trips are bit-exact (crops of the real CT series, several groups, one
slice decoded from the middle of a group, a volume in several tiles); the previous slices make
the overlapping CT series smaller than coding each slice alone, and a slice with nothing to
gain costs no more than alone (the per-slice fallback); a volume from another model and a
damaged one are refused; a cold tier named `learnvol` packs a real series and reads it back, in
process and on a running node (`compacs tier run`, then getscu).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import store_all, wait_compressed
from test_learned import another_model
from test_tiering import Inline, assert_read_back, frames_by_sop, later, make_service, receive
from test_tiering_node import COLD, tier_run

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.codecs.learned import Learned
from compacs.codecs.learned_volume import LearnedVolume
from compacs.codecs.volume import encode_verified, read_header
from compacs.models import interslice, wavefront
from compacs.models.features import ImageStats
from compacs.models.runtime import load_model

LEARNVOL = registry.get_volume("learnvol")


@functools.cache
def ct_crop(slices: int = 6, rows: slice = slice(200, 296), cols: slice = slice(150, 277)):
    """Slices of the real CT series (3 mm slices every 2 mm: their noise overlaps), cropped."""
    fmt, frames = dicomdata.ct_series_volume()
    crop = tuple(np.ascontiguousarray(f[rows, cols]) for f in frames[:slices])
    return dataclasses.replace(fmt, rows=crop[0].shape[0], columns=crop[0].shape[1]), crop


@functools.cache
def encoded_crop(gop_size: int = 4) -> bytes:
    fmt, frames = ct_crop()
    return encode_verified(LEARNVOL, frames, fmt, gop_size=gop_size)


def _same(got: list[np.ndarray], want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and np.array_equal(g, w)


def test_series_round_trip_is_bit_exact_across_groups() -> None:
    fmt, frames = ct_crop()
    data = encoded_crop()
    header = read_header(data)
    assert (header.codec, header.frames, header.groups) == ("learnvol", 6, 2)
    _same(LEARNVOL.decode_frames(data, fmt), frames)
    _same(LEARNVOL.decode_frames(data, fmt, [2]), [frames[2]])  # the middle of group 0
    _same(LEARNVOL.decode_frames(data, fmt, [5, 4]), [frames[5], frames[4]])


def test_signed_series_and_a_volume_in_several_tiles_round_trip() -> None:
    """The MR series is signed; 600x530 CT slices are 4 tiles each (512², 512x18, 88x512,
    88x18), and every tile of a slice reads the same tile of the slice before."""
    fmt, frames = dicomdata.mr_series_volume()
    data = encode_verified(LEARNVOL, frames[:5], fmt)
    _same(LEARNVOL.decode_frames(data, fmt), frames[:5])
    ct_fmt, ct = dicomdata.ct_series_volume()
    big = tuple(np.pad(f, ((0, 88), (0, 18)), mode="reflect") for f in ct[:2])
    big_fmt = dataclasses.replace(ct_fmt, rows=600, columns=530)
    coded = interslice.encode(load_model(), np.stack(big))
    assert len(coded.headers[0]) == 4
    back = interslice.decode(load_model(), coded, 600, 530)
    assert np.array_equal(back, np.stack(big))
    _same(LEARNVOL.decode_frames(LEARNVOL.encode_volume(big, big_fmt), big_fmt), big)


def test_previous_slices_pay_on_overlapping_ct_and_a_slice_that_gains_nothing_falls_back() -> None:
    fmt, frames = ct_crop()
    alone = sum(len(Learned(load_model()).encode_frame(f, fmt)) for f in frames)
    together = len(encoded_crop(gop_size=6))
    assert together < 0.97 * alone, (together, alone)
    coded = interslice.encode(load_model(), np.stack(frames))
    assert coded.params[0] == interslice.NONE  # nothing before the first slice
    assert all(p.active for p in coded.params[1:])
    # The same slices in reverse spatial order of rows: slice k's noise no longer lies under
    # slice k-1's, so a correction would cost; each slice then codes as alone.
    mixed = np.stack([f if k % 2 else f[::-1] for k, f in enumerate(frames)]).astype(np.int64)
    coded = interslice.encode(load_model(), mixed)
    for k in range(1, len(mixed)):
        header = wavefront.TileHeader(ImageStats.of(mixed[k]), 0)
        alone = wavefront.encode_lossless(load_model(), header, mixed[k]).nbytes
        words = sum(p.nbytes for p in coded.payloads[k])
        if coded.params[k] == interslice.NONE:
            assert words == alone, k  # the fallback codes exactly as the single-slice codec
        else:  # chosen by ideal code length: the coder may add a word
            assert words <= alone + 4, (k, coded.params[k])
    assert not all(p.active for p in coded.params[1:])


def test_volume_from_another_model_or_damaged_is_refused(tmp_path: Path) -> None:
    other_model = another_model(tmp_path)
    fmt, frames = ct_crop(3)
    data = LearnedVolume(other_model).encode_volume(frames, fmt)
    _same(LearnedVolume(other_model).decode_frames(data, fmt), frames)
    message = f"made by model {other_model.model_id.hex()}, but the loaded model is"
    with pytest.raises(ValueError, match=re.escape(message)):
        LEARNVOL.decode_frames(data, fmt)
    whole = encoded_crop()
    damaged = bytearray(whole)
    damaged[-30] ^= 0x55
    with pytest.raises(ValueError, match="checksum|does not decode"):
        LEARNVOL.decode_frames(bytes(damaged), fmt, [5])
    # A blob cut short inside a group's headers, and inside its words: a clear refusal.
    header = read_header(whole)
    start, _ = header.group_span(1)
    for cut in (start + 40, len(whole) - 6):
        short = bytearray(whole[:cut])
        # the container's last group end moved too, so that the container accepts the blob
        end = (cut - header.payload_start).to_bytes(8, "little")
        short[header.payload_start - 8 : header.payload_start] = end
        with pytest.raises(ValueError, match="truncated"):
            LEARNVOL.decode_frames(bytes(short), fmt, [5])


def test_tiles_narrower_than_the_wavefront_lag_decode_in_groups_of_one() -> None:
    """515 columns: a 3-column tile, whose wavefront has times without a pixel (gop_size 1:
    no other slice fills them). The frame codec takes the same shapes."""
    fmt, frames = dicomdata.ct_series_volume()
    narrow = tuple(np.ascontiguousarray(np.pad(f[200:212], ((0, 0), (0, 3)))) for f in frames[:2])
    narrow_fmt = dataclasses.replace(fmt, rows=12, columns=515)
    data = encode_verified(LEARNVOL, narrow, narrow_fmt, gop_size=1)
    _same(LEARNVOL.decode_frames(data, narrow_fmt), narrow)
    codec = Learned(load_model())
    _same([codec.decode_frame(codec.encode_frame(narrow[0], narrow_fmt), narrow_fmt)], narrow[:1])


def test_registry_and_what_it_refuses() -> None:
    assert "learnvol" in registry.volume_names() and "learnvol" not in registry.names()
    assert LEARNVOL.is_available() and LEARNVOL.lossless
    assert LEARNVOL.transfer_syntax_uid == "2.25.164530197483740761021022581188332038263"
    rgb = PixelFormat(64, 64, 3, 8, 8, 0, "RGB")
    assert "colour" in (LEARNVOL.unsupported_reason(rgb) or "")
    with pytest.raises(ValueError, match="codec 'learnvol' has no parameter delta"):
        LEARNVOL.check_params({"delta": 1})
    with pytest.raises(ValueError, match="learnvol gop_size must be an integer from 1 to 32"):
        LEARNVOL.check_params({"gop_size": 64})


def test_a_cold_tier_named_learnvol_packs_a_real_series_and_reads_it_back(tmp_path) -> None:
    service = make_service(tmp_path, codecs='["learnvol"]', choose="first")
    try:
        mr = dicomdata.real_mr_series(tmp_path / "mr")
        receive(service, mr)
        report = service.tier_run(later(), executor=Inline())
        assert not report.failed and report.series_packed == 1 and report.moved == len(mr)
        held = service.index.instances()
        assert {inst.codec for inst in held} == {"learnvol"}
        assert len({inst.blob_pk for inst in held}) == 1
        assert_read_back(service, frames_by_sop(mr))
    finally:
        service.close()


# The node-level cold tier of test_tiering_node.py, with learnvol as its only codec.
COLD_LEARNVOL = COLD.replace('["jpegxl", "hevc"]', '["learnvol"]').replace("smallest", "first")


def test_compacs_tier_run_packs_a_series_with_learnvol_and_getscu_reads_it(
    make_node, tmp_path
) -> None:
    """The node's own tier run (its worker processes load the model), then a C-GET of the
    series from the cold tier: pixel-exact, in a syntax getscu accepted."""
    node = make_node(COLD_LEARNVOL)
    mr = dicomdata.real_mr_series(tmp_path / "mr")
    store_all(node, mr)
    wait_compressed(node, len(mr))
    res = tier_run(node)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(mr)} instance(s) moved (1 series packed as volumes)" in res.stdout, res.stdout
    out = tmp_path / "get"
    study = pydicom.dcmread(mr[0]).StudyInstanceUID
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    assert len(got) == len(mr)
    for path in mr:
        src = pydicom.dcmread(path)
        back = pydicom.dcmread(got[src.SOPInstanceUID])
        assert back.file_meta.TransferSyntaxUID != LEARNVOL.transfer_syntax_uid
        assert np.array_equal(back.pixel_array, src.pixel_array)
