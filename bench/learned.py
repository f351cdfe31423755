"""The learned codec against JPEG-LS and JPEG-XL on held-out real CT, MR and CR images.

    .venv/bin/python bench/learned.py                 # everything (5-10 minutes on 2 shared cores)
    .venv/bin/python bench/learned.py --write-heldout # also rewrite models/heldout.json

Held out means never trained on (models/training/data.py `split`: the 20-slice TotalSegmentator CT
series, the Philips 1024² MR, the 10-frame and the 64² MR, the 15-bit Philips CR). Bits per
pixel = coded bytes · 8 / pixels, summed over each modality's images; every coded image is
decoded and checked (bit-exact, or max |error| ≤ δ). Lossless: learned δ = 0, JPEG-LS (CharLS
via pyjpegls, precision = BitsStored), JPEG-XL effort 7 lossless (imagecodecs; values - min as
uint16). Bounded: learned δ against JPEG-LS near-lossless NEAR = δ, for δ = 1, 2, 4. Times: one
held-out 512² CT slice with ONNX Runtime on 2 threads, median of 3, and the 20 slices decoded as
one batch. Volumes (the CT series, the 10-frame MR): learned per slice, `learnvol` (each slice
also predicted from the two before it, models/interslice.py) in groups of 16 and in one group,
HEVC lossless in groups of 16, JPEG-XL per slice; every volume decoded and compared, and
learnvol's encode and decode seconds per CT slice. Table to stdout and
bench/results/learned-<stamp>.md, plot learned-<stamp>.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from compacs.codecs.base import PixelFormat, from_unsigned_bits, to_unsigned_bits  # noqa: E402
from compacs.codecs.jpegls import JpegLS  # noqa: E402
from compacs.codecs.learned import Learned  # noqa: E402
from compacs.codecs.learned_volume import LearnedVolume  # noqa: E402
from compacs.codecs.volume import DEFAULT_GOP_SIZE  # noqa: E402
from compacs.models.runtime import SessionConfig, load_model  # noqa: E402
from compacs.models.training import data  # noqa: E402

DELTAS = (1, 2, 4)
MODALITIES = ("CT", "MR", "CR")
HELDOUT_JSON = common.ROOT / "models" / "heldout.json"
COLUMNS = ["learned", "JPEG-LS", "JPEG-XL e7"] + [
    f"{name} δ={d}" for d in DELTAS for name in ("learned", "JPEG-LS")
]


def fmt_of(image: data.RealImage) -> PixelFormat:
    rows, columns = image.pixels.shape
    return PixelFormat(rows, columns, 1, 16, image.bits_stored, int(image.signed), "MONOCHROME2")


def frame_of(image: data.RealImage) -> np.ndarray:
    return image.pixels.astype(fmt_of(image).dtype)


def jpegls_near(frame: np.ndarray, fmt: PixelFormat, delta: int) -> tuple[int, int]:
    """(bytes, max |error|) of CharLS near-lossless, NEAR = δ, decoded with imagecodecs."""
    import imagecodecs
    import jpeg_ls

    raw = np.ascontiguousarray(to_unsigned_bits(frame, fmt))
    coded = bytes(
        jpeg_ls.encode_buffer(
            raw.tobytes(), fmt.rows, fmt.columns, 1, fmt.bits_stored, lossy_error=delta
        )
    )
    back = from_unsigned_bits(imagecodecs.jpegls_decode(coded).reshape(fmt.frame_shape), fmt)
    return len(coded), int(np.abs(back.astype(np.int64) - frame).max())


def jpegxl(frame: np.ndarray) -> int:
    import imagecodecs

    x = frame.astype(np.int64)
    shifted = (x - x.min()).astype(np.uint16)
    coded = imagecodecs.jpegxl_encode(shifted, lossless=True, effort=7)
    if not np.array_equal(imagecodecs.jpegxl_decode(coded), shifted):
        raise AssertionError("JPEG-XL lossless did not round-trip")
    return len(coded)


def measure(images: list[data.RealImage], codec: Learned) -> dict[str, dict[str, float]]:
    """Bits per pixel per modality and column, every result decoded and checked."""
    bits: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    pixels: dict[str, int] = defaultdict(int)
    jpegls = JpegLS()
    by_format: dict[tuple, list[data.RealImage]] = defaultdict(list)
    for image in images:
        by_format[(image.modality, image.pixels.shape, image.bits_stored, image.signed)].append(
            image
        )
    for (modality, shape, _, _), group in by_format.items():
        fmt = fmt_of(group[0])
        frames = [frame_of(im) for im in group]
        common.progress(f"{modality} {shape[0]}x{shape[1]} x{len(frames)}")
        pixels[modality] += sum(f.size for f in frames)
        for frame in frames:
            coded = jpegls.encode_frame(frame, fmt)
            assert np.array_equal(jpegls.decode_frame(coded, fmt), frame)
            bits[modality]["JPEG-LS"] += 8 * len(coded)
            bits[modality]["JPEG-XL e7"] += 8 * jpegxl(frame)
            for delta in DELTAS:
                size, error = jpegls_near(frame, fmt, delta)
                assert error <= delta, f"JPEG-LS NEAR={delta} erred by {error}"
                bits[modality][f"JPEG-LS δ={delta}"] += 8 * size
        for delta in (0, *DELTAS):
            coded = codec.encode_frames(frames, fmt, delta=delta)
            back = codec.decode_frames(coded, fmt)
            for b, f in zip(back, frames, strict=True):
                error = int(np.abs(b.astype(np.int64) - f).max())
                assert error <= delta, f"learned δ={delta} erred by {error}"
            key = "learned" if delta == 0 else f"learned δ={delta}"
            bits[modality][key] += 8 * sum(len(c) for c in coded)
    return {m: {c: bits[m][c] / pixels[m] for c in COLUMNS} for m in MODALITIES if pixels[m]} | {
        "pixels": dict(pixels)
    }


SERIES_COLUMNS = [
    "learned, per slice",
    f"learnvol, groups of {DEFAULT_GOP_SIZE}",
    "learnvol, one group",
    f"HEVC, groups of {DEFAULT_GOP_SIZE}",
    "JPEG-XL e7, per slice",
]


def measure_series(volumes: dict[str, list[data.RealImage]], model) -> dict[str, dict]:
    """Bits per pixel of held-out volumes coded slice by slice and as volumes (every volume
    decoded and compared), and learnvol's CPU seconds per slice for the first volume."""
    from compacs.codecs import registry

    learned, learnvol, hevc = Learned(model), LearnedVolume(model), registry.get_volume("hevc")
    out: dict[str, dict] = {}
    for name, images in volumes.items():
        common.progress(f"series {name} x{len(images)}")
        fmt = fmt_of(images[0])
        frames = [frame_of(im) for im in images]
        sizes = {
            SERIES_COLUMNS[0]: sum(map(len, learned.encode_frames(frames, fmt))),
            SERIES_COLUMNS[4]: sum(jpegxl(f) for f in frames),
        }
        for column, codec, gop in (
            (SERIES_COLUMNS[1], learnvol, DEFAULT_GOP_SIZE),
            (SERIES_COLUMNS[2], learnvol, len(frames)),
            (SERIES_COLUMNS[3], hevc, DEFAULT_GOP_SIZE),
        ):
            if codec.data_unsupported_reason(frames, fmt):
                continue  # HEVC: a span wider than 12 bits
            t = time.perf_counter()
            blob = codec.encode_volume(frames, fmt, gop_size=gop)
            encode = time.perf_counter() - t
            t = time.perf_counter()
            back = codec.decode_frames(blob, fmt)
            decode = time.perf_counter() - t
            assert all(np.array_equal(b, f) for b, f in zip(back, frames, strict=True)), column
            sizes[column] = len(blob)
            if codec is learnvol and gop == DEFAULT_GOP_SIZE:
                out.setdefault("seconds per slice", {})[name] = {
                    "encode": encode / len(frames),
                    "decode": decode / len(frames),
                }
        pixels = sum(f.size for f in frames)
        out[name] = {c: 8 * sizes[c] / pixels if c in sizes else None for c in SERIES_COLUMNS}
    return out


def series_table(series: dict) -> list[str]:
    head = "| held-out volume | " + " | ".join(SERIES_COLUMNS) + " |"
    lines = [head, "|---" * (len(SERIES_COLUMNS) + 1) + "|"]
    for name, row in series.items():
        if name == "seconds per slice":
            continue
        cells = ["n/a" if row[c] is None else f"{row[c]:.3f}" for c in SERIES_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def timings(ct: list[data.RealImage]) -> dict[str, float]:
    """Seconds per 512² slice with ONNX Runtime on 2 threads (median of 3)."""
    codec = Learned(load_model(None, SessionConfig(threads=2)))
    fmt = fmt_of(ct[0])
    frame = frame_of(ct[0])
    out = {}
    for delta in (0, 2):
        enc, dec = [], []
        for _ in range(3):
            t = time.perf_counter()
            coded = codec.encode_frame(frame, fmt, delta=delta)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            codec.decode_frame(coded, fmt)
            dec.append(time.perf_counter() - t)
        out[f"encode δ={delta}"] = statistics.median(enc)
        out[f"decode δ={delta}"] = statistics.median(dec)
    frames = [frame_of(im) for im in ct]
    coded = codec.encode_frames(frames, fmt)
    t = time.perf_counter()
    codec.decode_frames(coded, fmt)
    out[f"decode δ=0, {len(frames)} slices as one batch, per slice"] = (
        time.perf_counter() - t
    ) / len(frames)
    return out


def plot(results: dict, series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODALITIES) + 1, figsize=(16, 3.8))
    for ax, modality in zip(axes[:-1], MODALITIES, strict=True):
        row = results[modality]
        xs = [0, *DELTAS]
        ax.plot(
            xs, [row["learned"]] + [row[f"learned δ={d}"] for d in DELTAS], "o-", label="learned"
        )
        ax.plot(
            xs,
            [row["JPEG-LS"]] + [row[f"JPEG-LS δ={d}"] for d in DELTAS],
            "s-",
            label="JPEG-LS (NEAR = δ)",
        )
        ax.plot([0], [row["JPEG-XL e7"]], "^", label="JPEG-XL e7 lossless")
        ax.set_title(f"held-out {modality}")
        ax.set_xlabel("δ (max |error|)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per pixel")
    axes[0].legend()
    ax = axes[-1]
    names = [n for n in series if n != "seconds per slice"]
    width = 0.8 / len(SERIES_COLUMNS)
    for k, column in enumerate(SERIES_COLUMNS):
        values = [series[n][column] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=column)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
    ax.set_title("held-out volumes, lossless")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> list[str]:
    lines = ["| held-out set | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in MODALITIES:
        lines.append(f"| {m} | " + " | ".join(f"{results[m][c]:.3f}" for c in COLUMNS) + " |")
    return lines


def targets(results: dict, series: dict, times: dict) -> list[str]:
    out = []
    for m in ("CT", "MR"):
        gain = 1 - results[m]["learned"] / results[m]["JPEG-XL e7"]
        out.append(
            f"- lossless {m}: {gain:.1%} smaller than JPEG-XL e7 (target ≥ 10 %): "
            f"{'met' if gain >= 0.10 else 'NOT met'}"
        )
    for m in MODALITIES:
        for d in DELTAS:
            gain = 1 - results[m][f"learned δ={d}"] / results[m][f"JPEG-LS δ={d}"]
            out.append(
                f"- δ={d} {m}: {gain:.1%} smaller than JPEG-LS NEAR={d} (target ≥ 15 %): "
                f"{'met' if gain >= 0.15 else 'NOT met'}"
            )
    for name in ("CT series", "MR 10 frames"):
        row = series[name]
        gain = 1 - row[SERIES_COLUMNS[1]] / row["JPEG-XL e7, per slice"]
        verdict = "met" if gain >= 0.10 else "NOT met"
        out.append(
            f"- lossless {name} as a learnvol volume (groups of {DEFAULT_GOP_SIZE}): {gain:.1%} "
            f"smaller than JPEG-XL e7 per slice (target ≥ 10 %): {verdict}"
        )
    dec = times["decode δ=0"]
    out.append(
        f"- CPU decode of a 512² slice, 2 threads: {dec:.2f} s (target < 2 s): "
        f"{'met' if dec < 2 else 'NOT met'}"
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write-heldout",
        action="store_true",
        help=f"write the figures the model card quotes to {HELDOUT_JSON}",
    )
    common.add_wait_quiet(parser)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    held_out = data.split(data.all_images())["held_out"]
    model = load_model(None, SessionConfig(threads=2))
    codec = Learned(model)
    if args.wait_quiet:
        common.wait_quiet(args.wait_quiet)
    results = measure(held_out, codec)
    ct = [im for im in held_out if im.group == data.TOTALSEG_SERIES_GROUP]
    times = timings(ct)
    emri = [im for im in held_out if im.group == "emri"]
    coded = codec.encode_frames([frame_of(im) for im in emri], fmt_of(emri[0]))
    emri_bpp = 8 * sum(map(len, coded)) / sum(im.pixels.size for im in emri)
    series = measure_series({"CT series": ct, "MR 10 frames": emri}, model)

    lines = [
        f"# Learned codec, held-out real images ({stamp})",
        "",
        f"- machine: {common.machine()}; command: `{common.command_line()}`",
        f"- model {model.name} ({model.meta['parameters']} parameters)",
        "- images: "
        + ", ".join(f"{m} {results['pixels'][m]:,} px" for m in MODALITIES)
        + " ("
        + ", ".join(sorted({im.group for im in held_out}))
        + ")",
        "",
        "Bits per pixel (lower is better):",
        "",
        *table(results),
        "",
        "Volumes, lossless, bits per pixel (learnvol: each slice also predicted from the two "
        "before it):",
        "",
        *series_table(series),
        "",
        "learnvol seconds per slice, ONNX Runtime CPU, 2 threads (the CT series: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in series["seconds per slice"]["CT series"].items())
        + ")",
        "",
        "Seconds per 512² CT slice, ONNX Runtime CPU, 2 threads (median of 3):",
        "",
        *[f"- {k}: {v:.2f} s" for k, v in times.items()],
        "",
        "Targets:",
        "",
        *targets(results, series, times),
    ]
    print("\n".join(lines))
    report = common.write_report("learned", stamp, lines)
    png = report.with_suffix(".png")
    plot(results, series, png)
    common.progress(f"plot: {png}")
    (report.with_suffix(".json")).write_text(
        json.dumps({"bpp": results, "seconds": times, "series": series})
    )
    if args.write_heldout:
        heldout = {
            "model_id": model.name,
            "measured": stamp,
            "command": "python bench/learned.py --write-heldout",
            "columns": COLUMNS,
            "rows": [
                {"set": m, "bpp": [round(results[m][c], 3) for c in COLUMNS]} for m in MODALITIES
            ],
            "pixels": results["pixels"],
            "series_columns": SERIES_COLUMNS,
            "series_rows": [
                {
                    "set": n,
                    "bpp": [None if r[c] is None else round(r[c], 3) for c in SERIES_COLUMNS],
                }
                for n, r in series.items()
                if n != "seconds per slice"
            ],
            "series_seconds_per_slice_2_threads": {
                k: round(v, 2) for k, v in series["seconds per slice"]["CT series"].items()
            },
            "seconds_per_512_slice_2_threads": {k: round(v, 2) for k, v in times.items()},
            "remeasure": {
                "emri_small_lossless_bpp": round(emri_bpp, 3),
                "emri_small_learnvol_bpp": round(series["MR 10 frames"][SERIES_COLUMNS[1]], 3),
            },
        }
        HELDOUT_JSON.write_text(json.dumps(heldout, indent=1) + "\n")
        common.progress(f"written {HELDOUT_JSON}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
