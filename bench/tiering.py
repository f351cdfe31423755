"""Tiering on real data: how fast objects move to a cold tier, how much smaller they get,
how long one slice takes to come out of a series volume, and what ingest does meanwhile.

Run: ``.venv/bin/python bench/tiering.py [--ingest 300] [--keep]``.

1. **Moves**: the real 20-slice CT series, the real MR series (20 slices), a 10-frame MR and
   a 60-frame US cine are received by an in-process archive service (SQLite, real codecs:
   JPEG-LS on the hot tier), then `tier_run` moves them to a cold tier (codecs jpegxl and
   hevc, series as volumes, the smallest verified kept) in its nice 19 worker, cpu_share 1.
   Reported: instances/s and input MB/s of the run, bytes on the hot and the cold tier.
2. **Slice from a volume**: the middle slice of the packed CT series read back (decoded, as
   a C-GET would) with an empty cache, median of 5; and the whole series read in order,
   per slice (the groups are decoded once).
3. **Ingest during a tier run**: a node receives `--ingest` CT 512² instances over one
   storescu association, once alone and once while `compacs tier run` (cpu_share 0.5) moves
   a backlog of the same node; stored/s compared.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import Executor, Future
from datetime import timedelta
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import dicomdata  # noqa: E402
import peers  # noqa: E402
import pydicom  # noqa: E402
from common import progress  # noqa: E402
from nodecheck import wait_compressed  # noqa: E402

from compacs.service.archive_service import ArchiveService  # noqa: E402
from compacs.service.config import load_config  # noqa: E402
from compacs.service.jobs import Jobs  # noqa: E402
from compacs.service.storage.archive import Archive  # noqa: E402
from compacs.service.storage.index import Index  # noqa: E402
from compacs.service.storage.schema import utcnow  # noqa: E402

COLD = """
[tiering]
stable_minutes = 0
cpu_share = {share}
every_minutes = 0
[[tiers]]
name = "cold"
after_days = 30
codecs = {codecs}
form = "volume"
choose = "smallest"
"""


class Inline(Executor):
    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def service_in(
    folder: Path, share: float = 1.0, codecs: str = '["jpegxl", "hevc"]'
) -> ArchiveService:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "compacs.toml"
    cfg.write_text(COLD.format(share=share, codecs=codecs))
    config = load_config(cfg, env={}, overrides={"data_dir": str(folder / "data")})
    config.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index.open(config.effective_index_url, create=True)
    archive = Archive(config.data_dir / "archive")
    return ArchiveService(config, archive, index, Jobs(config, archive, index, "bench:1", Inline))


def moves(
    tmp: Path, sizes: dict[str, tuple[int, int]]
) -> tuple[list[str], ArchiveService, list[Path]]:
    """Tier run of four real inputs; ``sizes`` gets (hot bytes, cold bytes) per input."""
    service = service_in(tmp / "moves")
    ct = dicomdata.real_ct_series(tmp / "ct")
    mr = dicomdata.real_mr_series(tmp / "mr")
    inputs = {
        "CT series (20 slices 512²)": ct,
        "MR series (20 slices 91 × 117)": mr,
        "multi-frame MR (10 frames 64²)": [dicomdata.fresh_copy("emri_small.dcm", tmp / "mf")],
        "US cine (60 frames 480 × 640 YBR)": [dicomdata.real_us_cine(tmp / "us", frames=60)],
    }
    raw_bytes = 0
    for files in inputs.values():
        for path in files:
            raw = path.read_bytes()
            ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
            assert service.receive(raw, "BENCH", ds.SOPClassUID, ds.SOPInstanceUID) == 0
            raw_bytes += (
                int(ds.Rows)
                * int(ds.Columns)
                * int(ds.get("SamplesPerPixel", 1))
                * (int(ds.BitsAllocated) // 8)
                * int(ds.get("NumberOfFrames", 1) or 1)
            )
    hot = service.index.stats()
    progress("tier run ...")
    report = service.tier_run(utcnow() + timedelta(days=31))
    cold = service.index.stats()
    lines = [
        "## Moves to the cold tier (jpegxl and hevc, series as volumes, smallest kept)",
        "",
        "| what | instances | codec on the cold tier | hot (JPEG-LS) bytes | cold bytes | "
        "cold vs hot |",
        "|---|---|---|---|---|---|",
    ]
    held = {i.sop_instance_uid: i for i in service.index.instances()}
    for name, files in inputs.items():
        rows = [
            held[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] for f in files
        ]
        codecs = sorted({r.codec for r in rows})
        cold_bytes = sum(r.stored_size for r in rows)
        hot_bytes = sum(received_jpegls(f) for f in files)
        sizes[name] = (hot_bytes, cold_bytes)
        lines.append(
            f"| {name} | {len(rows)} | {', '.join(codecs)} | {hot_bytes} | {cold_bytes} | "
            f"{(cold_bytes - hot_bytes) / hot_bytes * 100:+.1f} % |"
        )
    lines += [
        "",
        "Where the cold codec is the hot one, no candidate was smaller than what was stored "
        "and the stored bytes moved as they are.",
        "",
        f"Run: {report.moved} instances in {report.seconds:.1f} s = "
        f"{report.moved / report.seconds:.1f} instances/s, {raw_bytes / 1e6 / report.seconds:.1f} "
        f"MB/s of pixel data; tier bytes: hot {hot['bytes_stored']} before, cold "
        f"{cold['by_tier']['cold']['bytes_stored']} after; failed {len(report.failed)}.",
        "",
    ]
    return lines, service, ct, mr


def received_jpegls(path: Path) -> int:
    """The size the hot tier keeps (JPEG-LS, as the default rules store it)."""
    from compacs.service.compress import compress
    from compacs.service.rules import CodecChoice

    raw = path.read_bytes()
    return len(compress(raw, pydicom.dcmread(BytesIO(raw)), [CodecChoice("jpegls")]).data)


def slice_latency(
    tmp: Path, mr_service: ArchiveService, mr: list[Path], ct: list[Path]
) -> list[str]:
    """One slice out of a series volume with an empty cache, and a whole series in order:
    the MR series of part 1 (HEVC won there) and the CT series moved to an HEVC-only tier
    (JPEG-XL wins on CT, so part 1 keeps it per instance)."""
    ct_service = service_in(tmp / "ct-volume", codecs='["hevc"]')
    for path in ct:
        raw = path.read_bytes()
        ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
        assert ct_service.receive(raw, "BENCH", ds.SOPClassUID, ds.SOPInstanceUID) == 0
    progress("tier run (CT to an HEVC-only tier) ...")
    ct_service.tier_run(utcnow() + timedelta(days=31))
    lines = [
        "## One slice out of a series volume",
        "",
        "| series | kept as | middle slice, empty cache (median of 5) | "
        "whole series in order, per slice |",
        "|---|---|---|---|",
    ]
    for name, service, files in (
        ("MR 20 × 91 × 117", mr_service, mr),
        ("CT 20 × 512²", ct_service, ct),
    ):
        middle_ms, per_slice_ms, form = read_times(service, files)
        lines.append(f"| {name} | {form} | {middle_ms:.0f} ms | {per_slice_ms:.1f} ms |")
    ct_service.close()
    return [*lines, ""]


def read_times(service: ArchiveService, files: list[Path]) -> tuple[float, float, str]:
    from compacs.service.tiering.volumes import VolumeReader

    held = {i.sop_instance_uid: i for i in service.index.instances()}
    rows = [held[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] for p in files]
    middle = rows[len(rows) // 2]
    times = []
    for _ in range(5):
        service.volumes = VolumeReader()
        t0 = time.perf_counter()
        service.read_instance(middle)
        times.append(time.perf_counter() - t0)
    service.volumes = VolumeReader()
    t0 = time.perf_counter()
    for row in rows:
        service.read_instance(row)
    per_slice = (time.perf_counter() - t0) / len(rows)
    form = f"{middle.codec} series volume" if middle.frame_first is not None else middle.codec
    return statistics.median(times) * 1000, per_slice * 1000, str(form)


def ingest_during(tmp: Path, count: int, results: dict[str, float]) -> list[str]:
    """Stored/s alone and during a tier run, into ``results``."""
    for label in ("alone", "during a tier run"):
        folder = tmp / label.replace(" ", "-")
        folder.mkdir()
        (folder / "compacs.toml").write_text(COLD.format(share=0.5, codecs='["jpegxl", "hevc"]'))
        node = peers.CompacsProcess(folder / "data", config=folder / "compacs.toml")
        node.start()
        runner = None
        try:
            if label != "alone":  # a backlog to move: 200 CT slices already stored
                backlog = dicomdata.ct_series(folder / "backlog", 200)
                assert peers.store_ok(node.store(backlog), backlog)
                wait_compressed(node, 200)
                conf = ["--config", str(folder / "compacs.toml"), "--data", str(node.data_dir)]
                runner = subprocess.Popen(
                    [sys.executable, "-m", "compacs.service.cli", "tier", "run", *conf,
                     "--as-of", "2099-01-01"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(3)  # its worker busy
            files = dicomdata.ct_series(folder / "ingest", count)
            before = node.stats()["instances"]
            t0 = time.monotonic()
            res = node.store(files)
            assert peers.store_ok(res, files)
            wait_compressed(node, before + count, timeout=600)
            results[label] = count / (time.monotonic() - t0)
            busy = runner is not None and runner.poll() is None
            if runner is not None:
                runner.wait(timeout=600)
            progress(f"ingest {label}: {results[label]:.1f} stored/s (tier run still busy: {busy})")
        finally:
            node.stop()
    return [
        "## Ingest while a tier run is busy",
        "",
        f"{count} CT 512² instances, one storescu association, JPEG-LS verified: "
        f"{results['alone']:.1f} stored/s alone, {results['during a tier run']:.1f} stored/s "
        f"while `compacs tier run` (cpu_share 0.5, nice 19) moves 200 other slices "
        f"({results['during a tier run'] / results['alone'] * 100:.0f} %).",
        "",
    ]


def plot(sizes: dict[str, tuple[int, int]], rates: dict[str, float], path: Path) -> None:
    """Hot against cold bytes per input; ingest rate alone against during a tier run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=[3, 1])
    names = list(sizes)
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], [sizes[n][0] / 1e6 for n in names], 0.4, label="hot (JPEG-LS)")
    left.bar([x + 0.2 for x in xs], [sizes[n][1] / 1e6 for n in names], 0.4, label="cold")
    left.set_xticks(list(xs), [n.split(" (")[0] for n in names], fontsize=8)
    left.set_ylabel("MB stored")
    left.set_title("Bytes before and after the move to the cold tier")
    left.legend()
    if rates:
        right.bar(list(rates), list(rates.values()), color=["tab:green", "tab:red"])
        right.set_ylabel("instances stored per second")
        right.set_title("Ingest, 512² CT", fontsize=10)
        right.tick_params(axis="x", labelsize=8)
    else:
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", type=int, default=300, help="instances for part 3 (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    common.handle_signals()
    stamp, tmp = common.make_tmp("tiering")
    try:
        lines = [
            "# Tiering benchmark",
            "",
            f"Machine: {common.machine()}",
            f"Command: {common.command_line()}",
            "",
        ]
        sizes: dict[str, tuple[int, int]] = {}
        rates: dict[str, float] = {}
        part, service, ct, mr = moves(tmp, sizes)
        lines += part
        lines += slice_latency(tmp, service, mr, ct)
        service.close()
        if args.ingest:
            lines += ingest_during(tmp, args.ingest, rates)
        png = common.RESULTS_DIR / f"tiering-{stamp}.png"
        plot(sizes, rates, png)
        lines += [f"Plot: `{png.relative_to(common.ROOT)}`", ""]
        path = common.write_report("tiering", stamp, lines)
        print("\n".join(lines))
        progress(f"written to {path}")
    finally:
        common.cleanup(tmp, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
