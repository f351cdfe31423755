"""Codec benchmark: ratio and one-thread encode/decode speed of every codec, per instance and
as volumes, on the real images the registries carry (docs/design.md, "Real data").

Data: the 20-slice TotalSegmentator CT series (512², 12 of 16 bits;
`models/training/data.py`), its MR volume (20 × 91 × 117, signed, resampled NIfTI), the
enhanced CT (2 frames) and enhanced MR (10 frames of 64²) of pydicom, single images (signed CT
512², MR 1024², CR 15 and 10 bits, RGB US) and two ultrasound cines (120 frames of 480 × 640
and 30 of 240 × 320, decoded from JPEG baseline: YBR_FULL samples, so the cines are smoother
than a cine that never was JPEG).

Per-frame codecs (jpegls, j2k, htj2k, rle, jpegxl at effort 3 and 7) code every frame of a data
set on its own; hevc codes each data set as one volume (random access every `gop_size` = 16
frames, the default), and again with other `gop_size` values on the volumes, to show what
random access costs. Every result is decoded and compared bit-exact; "1 frame ms" is the time
to decode the middle frame alone (for hevc: its group). Times are the best of repeats for data
that codes in under 0.2 s, in CPU seconds of the process: every codec is set to one thread
(x265 pools=1 and frame-threads=1, libjxl numthreads=1, the HEVC decoder thread_count=1, the
others are single-threaded), so that is one core's speed whatever else runs on a shared
machine; "cpu/wall" of the encode says how much of the core it got (above 1.0 would mean a
second thread). MB = 10^6 bytes of stored samples (the frame convention of codecs/base.py);
bits/pixel counts pixels, not samples.

Run: ``.venv/bin/python bench/codecs.py [--only ct-series,us-cine] [--no-gop-sweep]``.
The table goes to stdout and to ``bench/results/codecs-<stamp>.md``, the plot (ratio against
encode speed, one point per codec and data set) to ``bench/results/codecs-<stamp>.png``.
A benchmark, not a test: nothing here asserts a speed or a ratio.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, from any cwd

import common  # noqa: E402  (puts tests/ on sys.path for the harness modules below)
import dicomdata  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from common import fmt, progress  # noqa: E402

from compacs.codecs import registry  # noqa: E402
from compacs.codecs.base import PixelFormat  # noqa: E402
from compacs.codecs.volume import VolumeCodec, read_header  # noqa: E402

FRAME_CODECS: list[tuple[str, dict[str, Any]]] = [
    ("jpegls", {}),
    ("j2k", {}),
    ("htj2k", {}),
    ("rle", {}),
    ("jpegxl", {"effort": 3}),
    ("jpegxl", {"effort": 7}),
]
GOP_SWEEP = (1, 4, 8, 32)  # besides the default 16; 32 covers whole 20- and 30-frame volumes
QUICK_SECONDS = 0.2  # code again (best of, up to 0.5 s in all) when one run is shorter


@dataclass(frozen=True)
class DataSet:
    key: str
    modality: str
    label: str
    kind: str  # series, multi-frame, single
    fmt: PixelFormat
    frames: tuple[np.ndarray, ...]

    @property
    def raw_bytes(self) -> int:
        return sum(frame.nbytes for frame in self.frames)

    @property
    def pixels(self) -> int:
        return len(self.frames) * self.fmt.rows * self.fmt.columns


@dataclass
class Result:
    data: DataSet
    codec: str
    form: str  # "per frame" or "volume"
    coded_bytes: int = 0
    encode_s: float = float("nan")
    decode_s: float = float("nan")
    frame_ms: float = float("nan")
    cpu_wall: float = float("nan")
    exact: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.data.raw_bytes / self.coded_bytes if self.coded_bytes else float("nan")

    @property
    def bpp(self) -> float:
        return self.coded_bytes * 8 / self.data.pixels if self.coded_bytes else float("nan")

    def mbps(self, seconds: float) -> float:
        return self.data.raw_bytes / seconds / 1e6


# --------------------------------------------------------------------------- data


# key: (modality, label, kind, loader)
SOURCES: dict[str, tuple[str, str, str, Callable[[], dicomdata.Volume]]] = {
    "ct-series": (
        "CT",
        "TotalSegmentator CT, 20 × 512², 12 bits",
        "series",
        dicomdata.ct_series_volume,
    ),
    "mr-series": (
        "MR",
        "TotalSegmentator MR, 20 × 91 × 117, signed",
        "series",
        dicomdata.mr_series_volume,
    ),
    "ct-multiframe": (
        "CT",
        "eCT_Supplemental, 2 × 512²",
        "multi-frame",
        lambda: dicomdata.pydicom_volume("eCT_Supplemental.dcm"),
    ),
    "mr-multiframe": (
        "MR",
        "emri_small, 10 × 64², 12 bits",
        "multi-frame",
        lambda: dicomdata.pydicom_volume("emri_small.dcm"),
    ),
    "us-cine": (
        "US",
        "color3d, 120 × 480 × 640 YBR (ex-JPEG)",
        "multi-frame",
        lambda: dicomdata.pydicom_volume("color3d_jpeg_baseline.dcm"),
    ),
    "us-cine-small": (
        "US",
        "examples_ybr_color, 30 × 240 × 320 YBR (ex-JPEG)",
        "multi-frame",
        lambda: dicomdata.pydicom_volume("examples_ybr_color.dcm"),
    ),
    "ct-signed": (
        "CT",
        "693_J2KR, 512², signed 16 bits",
        "single",
        lambda: dicomdata.pydicom_volume("693_J2KR.dcm"),
    ),
    "mr-1024": (
        "MR",
        "MR2_J2KR, 1024², 12 bits",
        "single",
        lambda: dicomdata.pydicom_volume("MR2_J2KR.dcm"),
    ),
    "cr-15bit": (
        "CR",
        "RG1_UNCR, 1955 × 1841, 15 bits",
        "single",
        lambda: dicomdata.pydicom_volume("RG1_UNCR.dcm"),
    ),
    "cr-10bit": (
        "CR",
        "RG3_UNCR, 1760², 10 bits",
        "single",
        lambda: dicomdata.pydicom_volume("RG3_UNCR.dcm"),
    ),
    "us-rgb": (
        "US",
        "US1_UNCR, 480 × 640 RGB",
        "single",
        lambda: dicomdata.pydicom_volume("US1_UNCR.dcm"),
    ),
}


def load(keys: Sequence[str]) -> list[DataSet]:
    out = []
    for key in keys:
        modality, label, kind, loader = SOURCES[key]
        fmt_, frames = loader()
        out.append(DataSet(key, modality, label, kind, fmt_, frames))
    return out


# --------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn(), its best CPU seconds over repeats while runs are short, and that run's cpu/wall.

    CPU time, not wall time: the machine is shared, and every codec here runs on one thread,
    so CPU seconds are what one core spends. cpu/wall above 1 would mean a second thread.
    """
    best, cpu_wall, result, total = float("inf"), float("nan"), None, 0.0
    while True:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if cpu < best:
            best, cpu_wall = cpu, cpu / wall if wall else float("nan")
        total += wall
        if wall >= QUICK_SECONDS or total >= 0.5:
            return result, best, cpu_wall


def _same(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> bool:
    return len(got) == len(want) and all(
        g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w)
        for g, w in zip(got, want, strict=True)
    )


def per_frame(name: str, params: dict[str, Any], data: DataSet) -> Result:
    codec = registry.get(name)
    label = name + (f" e{params['effort']}" if "effort" in params else "")
    result = Result(data, label, "per frame")
    reason = codec.unsupported_reason(data.fmt)
    if reason:
        result.note = reason
        return result
    encoded, result.encode_s, result.cpu_wall = timed(
        lambda: [codec.encode_frame(frame, data.fmt, **params) for frame in data.frames]
    )
    decoded, result.decode_s, _ = timed(lambda: [codec.decode_frame(e, data.fmt) for e in encoded])
    middle = encoded[len(encoded) // 2]
    _, one, _ = timed(lambda: codec.decode_frame(middle, data.fmt))
    result.frame_ms = one * 1e3
    result.coded_bytes = sum(len(e) for e in encoded)
    result.exact = _same(decoded, data.frames)
    return result


def as_volume(codec: VolumeCodec, params: dict[str, Any], data: DataSet) -> Result:
    gop = params.get("gop_size", 16)
    result = Result(data, f"{codec.name} K={gop}", "volume")
    reason = codec.unsupported_reason(data.fmt) or codec.data_unsupported_reason(
        data.frames, data.fmt
    )
    if reason:
        result.note = reason
        return result
    blob, result.encode_s, result.cpu_wall = timed(
        lambda: codec.encode_volume(data.frames, data.fmt, **params)
    )
    decoded, result.decode_s, _ = timed(lambda: codec.decode_frames(blob, data.fmt))
    middle = [len(data.frames) // 2]
    _, one, _ = timed(lambda: codec.decode_frames(blob, data.fmt, middle))
    result.frame_ms = one * 1e3
    result.coded_bytes = len(blob)
    result.exact = _same(decoded, data.frames)
    header = read_header(blob)
    result.note = f"{header.coded_bits}-bit after offset {header.offset}, {header.groups} group(s)"
    return result


# --------------------------------------------------------------------------- report


HEADER = (
    "| data | modality | codec | form | ratio | bits/pixel | enc MB/s | dec MB/s | 1 frame ms "
    "| enc cpu/wall | exact | note |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|"


def row(r: Result) -> str:
    cells = [r.data.key, r.data.modality, r.codec, r.form]
    if not r.coded_bytes:
        cells += ["-"] * 7
    else:
        cells += [fmt(r.ratio, 2), fmt(r.bpp, 2), fmt(r.mbps(r.encode_s))]
        cells += [fmt(r.mbps(r.decode_s)), fmt(r.frame_ms, 2), fmt(r.cpu_wall, 2)]
        cells.append("yes" if r.exact else "**NO**")
    return "| " + " | ".join([*cells, r.note]) + " |"


def verdicts(results: list[Result]) -> list[str]:
    """The issue's comparisons, from the measured rows (not from any expectation)."""

    def find(key: str, codec: str) -> Result | None:
        return next((r for r in results if r.data.key == key and r.codec == codec), None)

    lines = []
    ct = {c: find("ct-series", c) for c in ("hevc K=16", "hevc K=32", "jpegxl e7", "jpegls")}
    if all(r and r.coded_bytes for r in ct.values()):
        lines.append(
            "- CT series, bits/pixel: "
            + ", ".join(f"{c} {fmt(r.bpp, 3)}" for c, r in ct.items() if r is not None)
        )
    for key in ("us-cine", "us-cine-small", "mr-series", "mr-multiframe", "ct-series"):
        frame_rows = [r for r in results if r.data.key == key and r.form == "per frame" and r.exact]
        volume = find(key, "hevc K=16")
        if not frame_rows or volume is None or not volume.coded_bytes:
            continue
        best = min(frame_rows, key=lambda r: r.coded_bytes)
        gain = 1 - volume.coded_bytes / best.coded_bytes
        lines.append(
            f"- {key}: hevc K=16 {volume.coded_bytes} bytes against the best per-frame codec "
            f"({best.codec}) {best.coded_bytes}: {gain:+.1%} smaller"
            + (" (target >= 20 %: met)" if key == "us-cine" and gain >= 0.2 else "")
            + (" (target >= 20 %: NOT met)" if key == "us-cine" and gain < 0.2 else "")
        )
    for data_key in dict.fromkeys(r.data.key for r in results):
        rows = [r for r in results if r.data.key == data_key and r.exact]
        if rows:
            best = min(rows, key=lambda r: r.coded_bytes)
            lines.append(
                f"- smallest verified for {data_key}: {best.codec} ({fmt(best.ratio, 2)}:1)"
            )
    return lines


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codecs = list(dict.fromkeys(r.codec for r in results if r.coded_bytes))
    keys = list(dict.fromkeys(r.data.key for r in results))
    markers = "osD^v<>phX*P"
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for r in results:
        if not r.coded_bytes:
            continue
        ax.scatter(
            r.mbps(r.encode_s),
            r.ratio,
            color=colours(codecs.index(r.codec) % 20),
            marker=markers[keys.index(r.data.key) % len(markers)],
            s=40,
            edgecolors="black" if r.form == "volume" else "none",
        )
    for i, codec in enumerate(codecs):
        ax.scatter([], [], color=colours(i % 20), marker="o", label=codec)
    for i, key in enumerate(keys):
        ax.scatter([], [], color="grey", marker=markers[i % len(markers)], label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("encode MB per CPU second, one thread (log)")
    ax.set_ylabel("compression ratio (log)")
    ax.set_title("Lossless codecs on real images: ratio against encode speed (outlined: volumes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def versions() -> str:
    import av
    import imagecodecs

    return (
        f"Python {platform.python_version()}, pydicom {pydicom.__version__}, imagecodecs "
        f"{imagecodecs.__version__} ({imagecodecs.jpegxl_version()}), PyAV {av.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"data sets, comma-separated (of {', '.join(SOURCES)})")
    parser.add_argument("--no-gop-sweep", action="store_true", help="hevc with gop_size 16 only")
    common.add_wait_quiet(parser)
    args = parser.parse_args(argv)
    keys = args.only.split(",") if args.only else list(SOURCES)
    unknown = [k for k in keys if k not in SOURCES]
    if unknown:
        parser.error(f"unknown data set {', '.join(unknown)} (known: {', '.join(SOURCES)})")
    common.handle_signals()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    hevc = registry.get_volume("hevc")
    results: list[Result] = []
    started = time.perf_counter()
    busy0, own0 = common.machine_busy_seconds(), common.own_cpu_seconds()
    datasets = load(keys)
    for data in datasets:
        if args.wait_quiet:
            common.wait_quiet(args.wait_quiet)
        progress(f"{data.key}: {len(data.frames)} frame(s), {data.raw_bytes / 1e6:.1f} MB")
        runs: list[Callable[[DataSet], Result]] = [
            (lambda d, n=n, p=p: per_frame(n, p, d)) for n, p in FRAME_CODECS
        ]
        runs.append(lambda d: as_volume(hevc, {}, d))
        if not args.no_gop_sweep and len(data.frames) > 4:
            runs += [(lambda d, k=k: as_volume(hevc, {"gop_size": k}, d)) for k in GOP_SWEEP]
        for run in runs:
            result = run(data)
            results.append(result)
            progress(
                f"  {result.codec:<12} ratio {fmt(result.ratio, 2):>6}  "
                f"{'exact' if result.exact else result.note or 'NOT EXACT'}  "
                f"[{time.perf_counter() - started:.0f} s]"
            )
    wall = time.perf_counter() - started
    others = (common.machine_busy_seconds() - busy0 - (common.own_cpu_seconds() - own0)) / wall
    table = [HEADER, RULE, *(row(r) for r in results)]
    legend = ["| data | modality | kind | frames | MB | source |", "|---|---|---|---|---|---|"]
    for data in datasets:
        legend.append(
            f"| {data.key} | {data.modality} | {data.kind} | {len(data.frames)} | "
            f"{data.raw_bytes / 1e6:.1f} | {data.label} |"
        )
    summary = verdicts(results)
    print("\n".join(table))
    print("\n".join(summary))
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS_DIR / f"codecs-{stamp}.png"
    plot(results, png)
    progress(f"plot written to {png}")
    lines = [
        f"# Codecs, per instance and as volumes ({stamp})",
        "",
        f"- machine: {common.machine()}; one thread per codec; other processes used "
        f"{others:.2f} cores on average during the {wall:.0f} s run",
        f"- {versions()}",
        f"- command: `{common.command_line()}`",
        f"- plot: `{png.relative_to(common.ROOT)}`",
        "",
        *legend,
        "",
        *table,
        "",
        *summary,
    ]
    common.write_report("codecs", stamp, lines)
    return 0 if all(r.exact or not r.coded_bytes for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
