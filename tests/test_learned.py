"""The learned codec on real images, with the shipped model (CI never trains one).

What must hold: lossless is bit-exact; δ > 0 never errs by more than δ; a bitstream decodes
bit-identically under another ONNX Runtime configuration, and the wavefront decoder's integers
equal the whole-image network's at every pixel; the shipped network is integer-exact (every
accumulator below 2^24, and ONNX Runtime's float32 outputs equal an int64 recomputation); a
bitstream from another model is refused; large images code in seamless tiles; the model card
states what bench/learned.py measured. Training and export are smoke-tested (torch and onnx
come with the test extra).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import iter_pixels

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.codecs.learned import Learned
from compacs.models import runtime, wavefront
from compacs.models.features import ImageStats, image_features
from compacs.models.runtime import SHIPPED, Model, SessionConfig, load_model

MODELS = Path(__file__).resolve().parents[1] / "models"


@functools.cache
def _frames(name: str) -> tuple[PixelFormat, tuple[np.ndarray, ...]]:
    path = get_testdata_file(name, download=False)
    if not path:
        pytest.skip(f"{name} is in neither pydicom's test files nor pydicom-data")
    ds = pydicom.dcmread(path)
    return PixelFormat.from_dataset(ds), tuple(iter_pixels(ds, raw=True))


def _crop(name: str, rows: slice, cols: slice) -> tuple[PixelFormat, np.ndarray]:
    fmt, frames = _frames(name)
    frame = np.ascontiguousarray(frames[0][rows, cols])
    return PixelFormat(
        frame.shape[0],
        frame.shape[1],
        1,
        fmt.bits_allocated,
        fmt.bits_stored,
        fmt.pixel_representation,
        fmt.photometric_interpretation,
    ), frame


# Real slices: CT signed (512² and 128²), MR signed 64², a CR crop with odd sizes (15-bit,
# unsigned), a CT crop with odd sizes and negative values.
CASES = {
    "ct512_signed": lambda: (_frames("693_J2KR.dcm")[0], _frames("693_J2KR.dcm")[1][0]),
    "ct128_signed": lambda: (_frames("CT_small.dcm")[0], _frames("CT_small.dcm")[1][0]),
    "mr64_signed": lambda: (_frames("MR_small.dcm")[0], _frames("MR_small.dcm")[1][0]),
    "cr_crop_257x301": lambda: _crop("RG1_J2KR.dcm", slice(700, 957), slice(600, 901)),
    "ct_crop_97x131_negative": lambda: _crop("693_J2KR.dcm", slice(20, 117), slice(200, 331)),
}


@functools.cache
def _codec(threads: int = 0, optimise: bool = True) -> Learned:
    return Learned(load_model(None, SessionConfig(threads=threads, optimise=optimise)))


@pytest.mark.parametrize("case", CASES)
def test_lossless_round_trip_is_bit_exact(case: str) -> None:
    fmt, frame = CASES[case]()
    codec = _codec()
    assert codec.unsupported_reason(fmt) is None
    data = codec.encode_frame(frame, fmt)
    got = codec.decode_frame(data, fmt)
    assert got.dtype == frame.dtype and got.shape == frame.shape
    assert np.array_equal(got, frame)
    assert len(data) < frame.nbytes / 1.5  # it compresses, too


def test_multi_frame_batch_round_trip() -> None:
    """The 10 frames of an unsigned 12-bit MR decode as one batch per wavefront step."""
    fmt, frames = _frames("emri_small.dcm")
    codec = _codec()
    data = codec.encode_frames(list(frames), fmt)
    assert np.array_equal(codec.decode_frame(data[3], fmt), frames[3])  # one alone, too
    for got, want in zip(codec.decode_frames(data, fmt), frames, strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("delta", [1, 2, 4])
@pytest.mark.parametrize("case", ["ct128_signed", "cr_crop_257x301", "mr64_signed"])
def test_bounded_error_never_exceeds_delta(case: str, delta: int) -> None:
    fmt, frame = CASES[case]()
    codec = _codec()
    lossless = codec.encode_frame(frame, fmt)
    data = codec.encode_frame(frame, fmt, delta=delta)
    got = codec.decode_frame(data, fmt)
    error = np.abs(got.astype(np.int64) - frame)
    assert got.dtype == frame.dtype
    assert error.max() <= delta
    assert error.max() == delta  # real quantisation happened, not a lossless copy
    assert len(data) < len(lossless)


@pytest.mark.parametrize("delta", [0, 4])
def test_full_16_bit_range_round_trips(delta: int) -> None:
    """Plumbing only (synthetic on purpose): values at both ends of int16, so residuals of
    ±65535 go through the escape path; no ratio is measured on this."""
    rng = np.random.default_rng(7)
    frame = rng.integers(-32768, 32768, size=(24, 20), dtype=np.int64)
    frame[::5, ::3] = -32768
    frame[2::7, 1::4] = 32767
    frame = frame.astype(np.int16)
    fmt = PixelFormat(24, 20, 1, 16, 16, 1, "MONOCHROME2")
    got = _codec().decode_frame(_codec().encode_frame(frame, fmt, delta=delta), fmt)
    assert np.abs(got.astype(np.int64) - frame).max() <= delta


def test_params_and_lossless_for() -> None:
    codec = registry.get("learned")
    assert codec.transfer_syntax_uid == "2.25.113459380518506504330348662722377354476"
    assert codec.lossless and codec.is_available()
    assert codec.lossless_for({}) and codec.lossless_for({"delta": 0})
    assert not codec.lossless_for({"delta": 2}) and not codec.lossless_for({"delta": "2"})
    codec.check_params({"delta": "4"})
    for bad in (-1, 256, 1.5, "two", True):
        with pytest.raises(ValueError, match="delta must be an integer from 0"):
            codec.check_params({"delta": bad})
    with pytest.raises(ValueError, match="no parameter near"):
        codec.check_params({"near": 1})


def test_unsupported_reasons() -> None:
    codec = registry.get("learned")
    fmt = PixelFormat(64, 64, 1, 16, 12, 0, "MONOCHROME2")
    assert codec.unsupported_reason(fmt) is None
    rgb = PixelFormat(64, 64, 3, 8, 8, 0, "RGB")
    assert "colour" in (codec.unsupported_reason(rgb) or "")
    eight = PixelFormat(64, 64, 1, 8, 8, 0, "MONOCHROME2")
    assert "BitsAllocated 8" in (codec.unsupported_reason(eight) or "")
    eight_in_16 = PixelFormat(64, 64, 1, 16, 8, 0, "MONOCHROME2")
    assert "BitsStored 8" in (codec.unsupported_reason(eight_in_16) or "")
    tiny = PixelFormat(4, 64, 1, 16, 12, 0, "MONOCHROME2")
    assert "size 4x64" in (codec.unsupported_reason(tiny) or "")
    with pytest.raises(ValueError, match="cannot take this image: colour"):
        codec.encode_frame(np.zeros((64, 64, 3), np.uint8), rgb)


# --- decode anywhere ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ct128_signed", "cr_crop_257x301"])
@pytest.mark.parametrize("delta", [0, 2])
def test_other_session_configuration_decodes_bit_identically(
    case: str, delta: int, monkeypatch
) -> None:
    fmt, frame = CASES[case]()
    one_thread_optimised = _codec(threads=1, optimise=True)
    two_threads_plain = _codec(threads=2, optimise=False)
    data = one_thread_optimised.encode_frame(frame, fmt, delta=delta)
    assert two_threads_plain.encode_frame(frame, fmt, delta=delta) == data
    a = one_thread_optimised.decode_frame(data, fmt)
    b = two_threads_plain.decode_frame(data, fmt)
    assert np.array_equal(a, b)
    if delta == 0:
        assert np.array_equal(b, frame)
    # These steps are narrow, so the decode above ran them on the one-thread session; make
    # every step "wide" so that the configured two-thread pool decodes them too.
    monkeypatch.setattr(runtime, "NARROW_STEP", 0)
    assert np.array_equal(two_threads_plain.decode_frame(data, fmt), a)


@pytest.mark.parametrize("case", ["ct128_signed", "cr_crop_257x301"])
def test_wavefront_integers_equal_whole_image_network(case: str) -> None:
    """Every pixel's head accumulators: cached wavefront steps == one whole-image pass."""
    fmt, frame = CASES[case]()
    model = load_model(None, SessionConfig(threads=2, optimise=False))
    tile = frame.astype(np.int64)
    header = wavefront.TileHeader(ImageStats.of(tile), 0)
    payload = wavefront.encode_lossless(model, header, tile)
    rec, trace = wavefront.decode(model, [header], [payload], *tile.shape, trace=True)
    full, _, _ = wavefront.full_predictions(load_model(), header, tile)
    assert np.array_equal(rec[0], tile)
    assert np.array_equal(trace[0], full)


def _shift(acc: np.ndarray, s: int) -> np.ndarray:
    return acc >> s if s >= 0 else acc << -s


def _int_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int64 'same' cross-correlation, x (C, H, W), w (O, C, k, k)."""
    k = w.shape[-1]
    p = k // 2
    pad = np.pad(x, [(0, 0), (p, p), (p, p)])
    h, wd = x.shape[1:]
    out = np.broadcast_to(b.astype(np.int64)[:, None, None], (len(w), h, wd)).copy()
    for dy in range(k):
        for dx in range(k):
            tap = w[:, :, dy, dx].astype(np.int64)
            if tap.any():
                out += np.tensordot(tap, pad[:, dy : dy + h, dx : dx + wd], axes=1)
    return out


def test_shipped_network_is_integer_exact() -> None:
    """Accumulators below 2^24 for any input, and ORT's float32 equals int64 recomputation."""
    with np.load(SHIPPED / "weights.npz") as z:
        n = len([k for k in z.files if k.startswith("w")])
        layers = [(z[f"w{i}"], z[f"b{i}"], int(z[f"s{i}"])) for i in range(n)]
    meta = json.loads((SHIPPED / "meta.json").read_text())
    for i, (w, b, _) in enumerate(layers):
        assert w.dtype == np.int8 and b.dtype == np.int32
        bound = (np.abs(w.astype(np.int64)).reshape(len(w), -1).sum(1) * 127 + np.abs(b)).max()
        assert bound < 2**24, f"layer {i}"
        assert bound == meta["accumulator_bounds"][i]
    _, frame = CASES["ct128_signed"]()
    tile = frame.astype(np.int64)
    stats = ImageStats.of(tile)
    feats = image_features(tile, stats).astype(np.int64).transpose(2, 0, 1)
    w, b, s = layers[0]
    h = np.clip(_shift(_int_conv(feats, w, b), s), 0, 127)
    body = layers[1:-2]
    per_block = 2 if meta.get("inner", 0) else 1  # 3×3 layer, then the 1×1 inner layer
    assert len(body) == per_block * meta["blocks"]
    for k in range(0, len(body), per_block):
        w, b, s = body[k]
        y = _shift(_int_conv(h, w, b), s)
        if per_block == 2:
            w, b, s = body[k + 1]
            y = _shift(_int_conv(np.clip(y, 0, 127), w, b), s)
        h = np.clip(h + y, 0, 127)
    w, b, s = layers[-2]
    h = np.clip(_shift(_int_conv(h, w, b), s), 0, 127)
    w, b, _ = layers[-1]
    want = _int_conv(h, w, b).transpose(1, 2, 0)
    got = load_model().run_full(image_features(tile, stats)[None])[0].transpose(1, 2, 0)
    assert np.abs(want).max() > 1000  # a real network, not zeros
    assert np.array_equal(got, want)


def test_shipped_model_is_small_and_packaged() -> None:
    total = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert total < 2 * 1024 * 1024
    pyproject = (MODELS.parent / "pyproject.toml").read_text()
    assert '"compacs.models" = ["shipped/*"' in pyproject


# --- refusing what is not ours ----------------------------------------------------------------


def another_model(tmp_path: Path) -> Model:
    """The shipped model with one table count changed: another model, with another id."""
    other = tmp_path / "other"
    shutil.copytree(SHIPPED, other)
    with np.load(other / "tables.npz") as t:
        freqs, lows = t["freqs"].copy(), t["lows"]
    freqs[40, 64] += 1
    np.savez(other / "tables.npz", freqs=freqs, lows=lows)
    return Model(other)


def test_bitstream_from_another_model_is_refused(tmp_path: Path) -> None:
    """A model whose tables differ by one count is another model: its bitstreams are refused."""
    other_model = another_model(tmp_path)
    fmt, frame = CASES["mr64_signed"]()
    data = Learned(other_model).encode_frame(frame, fmt)
    assert np.array_equal(Learned(other_model).decode_frame(data, fmt), frame)
    shipped = load_model()
    assert other_model.model_id != shipped.model_id
    message = (
        f"made by model {other_model.model_id.hex()}, but the loaded model is "
        f"{shipped.model_id.hex()}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _codec().decode_frame(data, fmt)


@pytest.mark.parametrize("delta", [0, 2])
def test_objects_of_a_retired_model_still_decode(delta: int) -> None:
    """After an upgrade ships a new model, what the old one stored decodes with the new release."""
    from compacs.models.runtime import RETIRED

    folders = sorted(RETIRED.iterdir())
    assert folders, "the model that models/shipped/ replaced must be kept in models/retired/"
    fmt, frame = CASES["ct_crop_97x131_negative"]()
    for folder in folders:
        old = Model(folder)
        assert old.model_id.hex() == folder.name != load_model().name
        data = Learned(old).encode_frame(frame, fmt, delta=delta)
        back = _codec().decode_frame(data, fmt)
        assert np.abs(back.astype(np.int64) - frame).max() <= delta


def test_corrupt_bitstream_fails_its_checksum() -> None:
    fmt, frame = CASES["mr64_signed"]()
    data = bytearray(_codec().encode_frame(frame, fmt))
    data[-20] ^= 0x55
    with pytest.raises(ValueError, match="checksum|does not decode"):
        _codec().decode_frame(bytes(data), fmt)
    for cut in (60, len(data) - 6):  # inside the tile records, inside the words
        with pytest.raises(ValueError, match="truncated"):
            _codec().decode_frame(bytes(data[:cut]), fmt)
    with pytest.raises(ValueError, match="not a learned-codec bitstream"):
        _codec().decode_frame(b"JPEG" + bytes(data[4:]), fmt)


# --- large images: tiles --------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0, 2])
def test_tiles_join_without_seams(delta: int) -> None:
    """A 600x700 CR region is 4 tiles (512², 512x188, 88x512, 88x188); no seam at 512."""
    fmt, frame = _crop("RG1_J2KR.dcm", slice(600, 1200), slice(500, 1200))
    codec = _codec()
    got = codec.decode_frame(codec.encode_frame(frame, fmt, delta=delta), fmt)
    error = np.abs(got.astype(np.int64) - frame)
    assert error.max() <= delta
    if delta:
        seam = np.concatenate([error[510:514].ravel(), error[:, 510:514].ravel()])
        assert seam.max() <= delta
        assert seam.mean() <= error.mean() * 1.5  # the border is coded like the interior


# --- the model card states what the benchmark measured -------------------------------------


def _heldout() -> dict:
    return json.loads((MODELS / "heldout.json").read_text())


def test_model_card_figures_are_the_benchmark_results() -> None:
    results = _heldout()
    card = (MODELS / "MODEL_CARD.md").read_text()
    assert results["model_id"] == load_model().model_id.hex()
    assert results["model_id"] in card
    for row in results["rows"]:
        line = next((ln for ln in card.splitlines() if ln.startswith(f"| {row['set']} |")), None)
        assert line is not None, f"no row for {row['set']} in MODEL_CARD.md"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:] == [f"{v:.3f}" for v in row["bpp"]], row["set"]
    for row in results["series_rows"]:  # the volumes, learnvol among them
        line = next((ln for ln in card.splitlines() if ln.startswith(f"| {row['set']} |")), None)
        assert line is not None, f"no row for {row['set']} in MODEL_CARD.md"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:] == ["n/a" if v is None else f"{v:.3f}" for v in row["bpp"]], row["set"]


def test_one_heldout_figure_remeasured() -> None:
    """The held-out 10-frame MR's lossless bpp, per frame and as a learnvol volume, measured
    again: each must equal the card's."""
    fmt, frames = _frames("emri_small.dcm")
    size = sum(len(d) for d in _codec().encode_frames(list(frames), fmt))
    bpp = size * 8 / sum(f.size for f in frames)
    assert round(bpp, 3) == _heldout()["remeasure"]["emri_small_lossless_bpp"]
    volume = registry.get_volume("learnvol").encode_volume(list(frames), fmt)
    bpp = len(volume) * 8 / sum(f.size for f in frames)
    assert round(bpp, 3) == _heldout()["remeasure"]["emri_small_learnvol_bpp"]


# --- training and export (torch and onnx are in the test extra) -------------------------


def _tiny_run(steps: int, inner: int = 1):
    """A real CT crop to train on and a config small enough for CI (float and QAT steps each)."""
    from compacs.models.training import data, train

    _, frame = CASES["ct128_signed"]()
    crop = data.RealImage("CT_small crop", "CT", "1CT1", frame[:64, :96].astype(np.int32), 16, True)
    cfg = train.Config(
        float_steps=steps, qat_steps=steps, batch=2, crop=32, channels=8, blocks=2, inner=inner
    )
    return crop, cfg


def test_training_smoke_resumes_without_loss(tmp_path: Path, monkeypatch) -> None:
    import torch

    from compacs.models.training import train

    crop, cfg = _tiny_run(3)
    whole = train.train([crop], [crop], cfg, tmp_path / "a", checkpoint_every=1, progress=False)
    assert whole["steps"] == 6 and all(np.isfinite(e["train_bpp"]) for e in whole["log"])

    real_loss = train.bits_per_pixel
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "bits_per_pixel", interrupted)
    with pytest.raises(SystemExit):
        train.train([crop], [crop], cfg, tmp_path / "b", checkpoint_every=1, progress=False)
    monkeypatch.setattr(train, "bits_per_pixel", real_loss)
    train.train([crop], [crop], cfg, tmp_path / "b", checkpoint_every=1, progress=False)
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    from compacs.models.training import export

    export.export(tmp_path / "a" / "final.pt", tmp_path / "model")
    small = Learned(Model(tmp_path / "model"))
    mfmt, mframe = CASES["mr64_signed"]()
    assert np.array_equal(small.decode_frame(small.encode_frame(mframe, mfmt), mfmt), mframe)


def test_training_reads_packed_images_and_refuses_a_device_it_lacks(tmp_path: Path) -> None:
    """The GPU route (models/training/device_train.sh): images packed here come back exactly,
    the train command runs from the pack alone, and a device or pack that is not there gets a
    message."""
    import torch

    from compacs.models.training import data, train

    crop, _ = _tiny_run(1)
    mr = data.RealImage("MR crop", "MR", "021234567", crop.pixels[:40, :50] + 70000, 17, False)
    pack = tmp_path / "images.npz"
    data.pack([crop, mr], pack)
    back = data.unpack(pack)

    def fields(images: list[data.RealImage]) -> list[tuple]:
        return [(im.source, im.modality, im.group, im.bits_stored, im.signed) for im in images]

    assert fields(back) == fields([crop, mr])
    for a, b in zip([crop, mr], back, strict=True):
        assert b.pixels.dtype == np.int32 and np.array_equal(a.pixels, b.pixels)

    # The device script's run, here on the CPU: the pack alone, a package shim, train, export.
    env = dict(os.environ, DEVICE_DIR=str(tmp_path), OUT=str(tmp_path / "out"), DEVICE="cpu")
    env |= {"PYTHON": sys.executable, "FLOAT_STEPS": "1", "QAT_STEPS": "1", "BATCH": "2"}
    env |= {"CHANNELS": "8", "BLOCKS": "2", "THREADS": "1"}
    script = [
        shutil.which("bash") or "bash",
        str(Path(__file__).resolve().parents[1] / "models" / "training" / "device_train.sh"),
        "run",
    ]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "run" / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["train_groups"] == ["1CT1"]
    assert summary["validation_groups"] == ["021234567"] and summary["steps"] == 2
    assert Model(tmp_path / "out" / "model").meta["channels"] == 8
    pack.unlink()
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "prepare" in done.stderr

    with pytest.raises(SystemExit, match="no such file"):
        train.main(["--images", str(tmp_path / "missing.npz")])
    with pytest.raises(SystemExit, match="not a torch device"):
        train.pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            train.pick_device("cuda")


def test_training_continues_from_an_exported_model(tmp_path: Path) -> None:
    """`--init FOLDER` starts from an export's integers: a continued run with no steps exports
    the same integers again (for a tiny trained model and for the shipped one), so a longer
    run picks up exactly where the shipped model stands; a folder of another shape is refused.
    """
    from compacs.models.training import export, train
    from compacs.models.training.network import CausalNet

    crop, cfg = _tiny_run(2)
    train.train([crop], [crop], cfg, tmp_path / "a", checkpoint_every=2, progress=False)
    export.export(tmp_path / "a" / "final.pt", tmp_path / "model")
    again = dataclasses.replace(cfg, float_steps=0, qat_steps=0, init=str(tmp_path / "model"))
    summary = train.train([crop], [crop], again, tmp_path / "b", progress=False)
    assert summary["continued_from"]["steps"] == 4
    export.export(tmp_path / "b" / "final.pt", tmp_path / "model_b")
    with (
        np.load(tmp_path / "model" / "weights.npz") as a,
        np.load(tmp_path / "model_b" / "weights.npz") as b,
    ):
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)

    shipped = json.loads((SHIPPED / "meta.json").read_text())
    net = CausalNet(shipped["channels"], shipped["blocks"], shipped["inner"])
    train.load_exported(net, SHIPPED)
    with np.load(SHIPPED / "weights.npz") as w:
        for i, layer in enumerate(export.integer_layers(net)):
            assert np.array_equal(layer.weight, w[f"w{i}"]), i
            assert np.array_equal(layer.bias, w[f"b{i}"]) and layer.shift == int(w[f"s{i}"]), i

    with pytest.raises(SystemExit, match="--channels"):
        train.load_exported(CausalNet(8, 2, 0), tmp_path / "model")
    with pytest.raises(SystemExit, match="no meta.json or weights.npz"):
        train.load_exported(net, tmp_path)


@pytest.mark.parametrize("inner", [0, 1])
def test_exported_network_computes_what_qat_trained(tmp_path: Path, inner: int) -> None:
    """The ONNX graphs give exactly the QAT forward pass's outputs, with or without inner layers.

    Checked in float64 torch, where every value is a small dyadic rational and no convolution
    algorithm rounds; then the exported model round-trips lossless and δ = 2 through the
    wavefront decoder, whose integers must equal the whole-image graph's.
    """
    import torch

    from compacs.models.training import export, train
    from compacs.models.training.network import CausalNet

    fmt, frame = CASES["ct128_signed"]()
    crop, cfg = _tiny_run(4, inner)
    train.train([crop], [crop], cfg, tmp_path / "run", checkpoint_every=4, progress=False)
    meta = export.export(tmp_path / "run" / "final.pt", tmp_path / "model")
    assert meta["inner"] == inner and len(meta["accumulator_bounds"]) == 3 + cfg.blocks * (
        1 + inner
    )
    model = Model(tmp_path / "model")

    state = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    net = CausalNet(cfg.channels, cfg.blocks, inner)
    net.load_state_dict(state["net"])
    net.double()
    tile = frame.astype(np.int64)
    stats = ImageStats.of(tile)
    feats = image_features(tile, stats)
    with torch.no_grad():
        mean, log_scale = net(
            torch.from_numpy(feats.transpose(2, 0, 1)[None].astype(np.float64)), True
        )
    acc = model.run_full(feats[None])[0]
    shift = meta["head_shift"]
    assert len(np.unique(acc[0])) > 100 and len(np.unique(acc[1])) > 100  # not a blank network
    assert np.array_equal(mean[0].numpy() * 2.0**shift, acc[0].astype(np.float64))
    assert np.array_equal(log_scale[0].numpy() * 8, (acc[1] >> (shift - 3)).astype(np.float64))

    codec = Learned(model)
    header = wavefront.TileHeader(stats, 0)
    payload = wavefront.encode_lossless(model, header, tile)
    rec, trace = wavefront.decode(model, [header], [payload], *tile.shape, trace=True)
    assert np.array_equal(rec[0], tile) and np.array_equal(trace[0], acc.transpose(1, 2, 0))
    back = codec.decode_frame(codec.encode_frame(frame, fmt, delta=2), fmt)
    assert np.abs(back.astype(np.int64) - tile).max() <= 2
