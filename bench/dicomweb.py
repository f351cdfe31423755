"""DICOMweb benchmark: a 300-slice CT series stored as JPEG-LS, read the way a web viewer reads it.

One series of ``--count`` (300) CT 512² instances (``dicomdata.ct_series``: a real slice, fresh
UIDs, uncompressed) is stored into each server, which keeps it as JPEG-LS lossless:

  orthanc      Orthanc 1.10 + Debian's orthanc-dicomweb, IngestTranscoding = JPEG-LS lossless,
               started by the bench (REST upload); its root is ``/dicom-web``
  compacs      ``compacs serve`` on its defaults (JPEG-LS lossless for CT) plus ``--web-port``,
               started by the bench (``--no-compacs``: not); STOW-RS upload, root ``/dicomweb``
  LABEL=URL    ``--server``, repeatable: any running DICOMweb root (compacs' ``/dicomweb``),
               the series stored with STOW-RS; the server's own rules compress it (the bench
               waits up to ``--settle`` s until ``transfer-syntax=*`` stops answering
               uncompressed, and reports the syntax it got)

Measured per server, on keep-alive HTTP/1.1 connections, every answer read whole:

  metadata cold  the first ``GET .../series/{uid}/metadata`` after the store
  metadata warm  median of ``--repeat`` (5) more of the same request
  first frame    a fresh connection plus ``GET .../instances/{uid}/frames/1`` for an
                 instance not requested before, median over 5 instances, per Accept
  frames/s       frame 1 of every instance, split over 1 or 6 connections at once (a
                 browser's 6 per host), wall from the first request to the last answer;
                 Accept ``multipart/related; type="application/octet-stream";
                 transfer-syntax=*`` (the stored bytes) and ``...; transfer-syntax=
                 1.2.840.10008.1.2.1`` (uncompressed: the server decodes); measured
                 ``--rounds`` (3) times with every server up, the servers taking turns
                 in each round so that the machine's drift (a shared VM's speed moves
                 by a third within minutes) falls on all alike; the medians reported

A run counts only when every answer is 200 with one part in the expected syntax (uncompressed:
the right length) and the first and last frames decode to the original pixels; failures are
reported, not averaged. Nothing asserts a speed. Table to stdout and
``bench/results/dicomweb-<stamp>.md``, plot to ``bench/results/dicomweb-<stamp>.png``.

Run: ``.venv/bin/python bench/dicomweb.py [--count 300] [--repeat 5] [--rounds 3]
[--server other=http://127.0.0.1:8080/dicomweb] [--no-orthanc] [--no-compacs] [--keep]
[--wait-quiet S]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, from any cwd

import common  # noqa: E402  (puts tests/ on sys.path for the harness modules below)
import dicomdata  # noqa: E402
import peers  # noqa: E402
from common import fmt, progress  # noqa: E402
from dicomweb_servers import (  # noqa: E402
    EXPLICIT_LE,
    JPEG_LS_LOSSLESS,
    DicomWebServer,
    connection,
    get,
    multipart_parts,
    orthanc_dicomweb_config,
    orthanc_server,
    root_path,
    stow,
    transfer_syntax_of,
)

ACCEPT = {
    "*": 'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    "raw": f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT_LE}',
}
PARALLEL = (1, 6)
FIRST_FRAME_SAMPLES = 5


@dataclass
class Series:
    """The stored series: its UIDs in instance order and the pixels every slice holds."""

    study: str
    series: str
    sops: list[str]
    pixels: np.ndarray


@dataclass
class Result:
    """One server's numbers (None: not measured); ``problems`` says what failed."""

    name: str
    root: str
    stored_syntax: str = "-"
    metadata_cold_ms: float | None = None
    metadata_warm_ms: float | None = None
    metadata_kb: float | None = None
    first_frame_ms: dict[str, float] = field(default_factory=dict)
    fps: dict[tuple[str, int], float] = field(default_factory=dict)  # median of rounds
    rounds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def make_series(tmp: Path, count: int) -> tuple[Series, list[Path]]:
    files = dicomdata.ct_series(tmp / "in", count, prefix="web")
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files]
    return Series(
        first.StudyInstanceUID, first.SeriesInstanceUID, sops, dicomdata.ct_slice_pixels()
    ), files


def frame_path(server: DicomWebServer, s: Series, sop: str) -> str:
    return f"{root_path(server.root)}/studies/{s.study}/series/{s.series}/instances/{sop}/frames/1"


def check_frame(
    mode: str, ctype: str, body: bytes, s: Series, syntax: str, decode: bool = False
) -> str | None:
    """Why a frame answer is wrong (None: right): one part, the expected syntax, and (with
    ``decode``) the original pixels."""
    try:
        parts = multipart_parts(ctype, body)
    except ValueError as exc:
        return str(exc)
    if len(parts) != 1:
        return f"{len(parts)} parts for one frame"
    headers, payload = parts[0]
    got = transfer_syntax_of(headers.get("content-type", "")) or EXPLICIT_LE
    want = syntax if mode == "*" else EXPLICIT_LE
    if got != want:
        return f"part in {got}, expected {want} ({headers.get('content-type')})"
    raw = s.pixels.astype("<i2" if s.pixels.dtype.kind == "i" else "<u2").tobytes()
    if mode == "raw" and len(payload) != len(raw):
        return f"uncompressed frame of {len(payload)} bytes, expected {len(raw)}"
    if decode:
        if got == EXPLICIT_LE:
            same = payload == raw
        elif got == JPEG_LS_LOSSLESS:
            import imagecodecs

            decoded = imagecodecs.jpegls_decode(payload)
            same = decoded.astype(s.pixels.dtype).tobytes() == s.pixels.tobytes()
        else:
            return None  # no decoder here for that syntax: length and syntax checked only
        if not same:
            return f"frame in {got} does not decode to the original pixels"
    return None


def wait_syntax(server: DicomWebServer, s: Series, settle: float) -> str:
    """The syntax ``transfer-syntax=*`` answers for the last instance, once it is no longer
    uncompressed (a server compressing after the acknowledgement) or ``settle`` s passed."""
    deadline = time.monotonic() + settle
    while True:
        conn = connection(server.root)
        status, ctype, body = get(conn, frame_path(server, s, s.sops[-1]), ACCEPT["*"])
        conn.close()
        if status != 200:
            raise peers.PeerError(f"{server.name}: frame request answered {status}: {body[:300]!r}")
        [(headers, _)] = multipart_parts(ctype, body)
        syntax = transfer_syntax_of(headers.get("content-type", "")) or EXPLICIT_LE
        if syntax != EXPLICIT_LE or time.monotonic() >= deadline:
            return syntax
        time.sleep(0.5)


def fetch_frames(
    server: DicomWebServer, s: Series, mode: str, parallel: int, syntax: str
) -> tuple[float, list[str]]:
    """Frame 1 of every instance over ``parallel`` connections; (frames/s, problems)."""
    chunks = [s.sops[i::parallel] for i in range(parallel)]
    problems: list[str] = []
    start = threading.Barrier(parallel + 1)

    def worker(sops: list[str]) -> None:
        conn = connection(server.root)
        conn.connect()
        start.wait()
        try:
            for sop in sops:
                status, ctype, body = get(conn, frame_path(server, s, sop), ACCEPT[mode])
                if status != 200:
                    problems.append(f"{sop}: HTTP {status}")
                    continue
                edge = sop in (s.sops[0], s.sops[-1])
                why = check_frame(mode, ctype, body, s, syntax, decode=edge)
                if why:
                    problems.append(f"{sop}: {why}")
        except OSError as exc:
            problems.append(f"connection failed: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return len(s.sops) / wall, problems


def wait_compressed(node: peers.CompacsProcess, count: int, timeout: float) -> None:
    """Until the node's index holds `count` instances and none waits for compression."""
    deadline = time.monotonic() + timeout
    while True:
        stats = node.stats()
        if stats["instances"] >= count and stats["pending"] == 0:
            return
        if time.monotonic() > deadline:
            raise peers.PeerError(f"compacs did not compress in {timeout:.0f} s: {stats}")
        time.sleep(1.0)


def measure(
    server: DicomWebServer, s: Series, repeat: int, settle: float, wait_quiet: float
) -> Result:
    res = Result(server.name, server.root)
    meta = f"{root_path(server.root)}/studies/{s.study}/series/{s.series}/metadata"
    conn = connection(server.root)
    times = []
    for i in range(1 + repeat):
        t0 = time.perf_counter()
        status, _, body = get(conn, meta, "application/dicom+json")
        times.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            res.problems.append(f"metadata answered {status}: {body[:300]!r}")
            return res
        if i == 0:
            found = len(json.loads(body))
            if found != len(s.sops):
                res.problems.append(f"metadata lists {found} instances of {len(s.sops)}")
            res.metadata_kb = len(body) / 1024
    conn.close()
    res.metadata_cold_ms, res.metadata_warm_ms = times[0], statistics.median(times[1:])

    res.stored_syntax = wait_syntax(server, s, settle)
    if res.stored_syntax != JPEG_LS_LOSSLESS:
        res.problems.append(f"stored as {res.stored_syntax}, not JPEG-LS lossless")
    # first-frame latency: instances 1..5 for '*', 6..10 for raw (the last one was asked)
    for k, mode in enumerate(ACCEPT):
        samples = []
        for sop in s.sops[1 + k * FIRST_FRAME_SAMPLES : 1 + (k + 1) * FIRST_FRAME_SAMPLES]:
            t0 = time.perf_counter()
            conn = connection(server.root)
            status, ctype, body = get(conn, frame_path(server, s, sop), ACCEPT[mode])
            samples.append((time.perf_counter() - t0) * 1000)
            conn.close()
            why = (
                f"HTTP {status}"
                if status != 200
                else check_frame(mode, ctype, body, s, res.stored_syntax, decode=True)
            )
            if why:
                res.problems.append(f"first frame ({mode}): {why}")
        res.first_frame_ms[mode] = statistics.median(samples)

    return res


def frame_rates(
    pairs: list[tuple[DicomWebServer, Result]], s: Series, rounds: int, wait_quiet: float
) -> None:
    """Frames/s of every server, `rounds` times over, the servers taking turns within each
    round (and each Accept and connection count within a server's turn): a drift of the
    machine's speed during the run then falls on all of them alike. The median of a
    server's rounds goes in its Result; every round's figure in `rounds`."""
    for n in range(rounds):
        for server, res in pairs:
            for mode in ACCEPT:
                for parallel in PARALLEL:
                    if wait_quiet:
                        common.wait_quiet(wait_quiet)
                    progress(
                        f"round {n + 1}/{rounds} {server.name}: frames, Accept {mode}, "
                        f"{parallel} connection(s)"
                    )
                    rate, problems = fetch_frames(server, s, mode, parallel, res.stored_syntax)
                    if problems:
                        res.problems += [f"frames {mode} x{parallel}: {p}" for p in problems[:5]]
                    else:
                        res.rounds.setdefault((mode, parallel), []).append(rate)
    for _, res in pairs:
        res.fps = {key: statistics.median(rates) for key, rates in res.rounds.items()}


def table(results: list[Result], count: int) -> list[str]:
    head = [
        "server",
        "stored as",
        "metadata KB",
        "metadata cold ms",
        "metadata warm ms",
        "first frame ms (*)",
        "first frame ms (raw)",
    ]
    head += [f"frames/s {m} x{p}" for m in ACCEPT for p in PARALLEL]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [
            r.name,
            r.stored_syntax,
            fmt(r.metadata_kb, 0),
            fmt(r.metadata_cold_ms),
            fmt(r.metadata_warm_ms),
            fmt(r.first_frame_ms.get("*")),
            fmt(r.first_frame_ms.get("raw")),
        ]
        row += [fmt(r.fps.get((m, p))) for m in ACCEPT for p in PARALLEL]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"{count} instances of CT 512², frame 1 of each; `*` = `transfer-syntax=*` (stored "
        "bytes), raw = explicit VR little endian (decoded by the server); x1/x6 = connections "
        "at once.",
        "",
    ]
    keys = [(m, p) for m in ACCEPT for p in PARALLEL]
    lines += ["Frames/s in each round (the servers took turns; the table gives the medians):", ""]
    for r in results:
        for m, p in keys:
            lines.append(
                f"- {r.name} {m} x{p}: " + " ".join(fmt(v) for v in r.rounds.get((m, p), []))
            )
    base = next((r for r in results if r.name == "orthanc"), None)
    if base is not None:
        for r in results:
            if r is base:
                continue
            ratios = [
                f"{m} x{p} {r.fps[(m, p)] / base.fps[(m, p)]:.2f}x"
                for m, p in keys
                if base.fps.get((m, p)) and r.fps.get((m, p))
            ]
            lines += ["", f"{r.name} / orthanc, medians: " + ", ".join(ratios)]
    lines.append("")
    for r in results:
        for p in r.problems:
            lines.append(f"- {r.name}: PROBLEM {p}")
    return lines


def plot(results: list[Result], path: Path) -> None:
    """Latencies (ms) and frame rates per server, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    lat = {
        "metadata cold": lambda r: r.metadata_cold_ms,
        "metadata warm": lambda r: r.metadata_warm_ms,
        "first frame *": lambda r: r.first_frame_ms.get("*"),
        "first frame raw": lambda r: r.first_frame_ms.get("raw"),
    }
    rates = {f"{m} x{p}": (m, p) for m in ACCEPT for p in PARALLEL}
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        off = (i - (len(results) - 1) / 2) * width
        left.bar(
            [x + off for x in range(len(lat))],
            [f(r) or 0 for f in lat.values()],
            width,
            label=r.name,
        )
        right.bar(
            [x + off for x in range(len(rates))],
            [r.fps.get(k, 0) for k in rates.values()],
            width,
            label=r.name,
        )
    left.set_xticks(range(len(lat)), list(lat), fontsize=8)
    left.set_ylabel("ms")
    left.set_yscale("log")
    left.set_title("Series metadata and first frame")
    right.set_xticks(range(len(rates)), list(rates), fontsize=8)
    right.set_ylabel("frames per second")
    right.set_title("Frame 1 of every instance (Accept syntax x connections)")
    for ax in (left, right):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances in the series")
    parser.add_argument("--repeat", type=int, default=5, help="warm metadata requests")
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="LABEL=URL",
        help="a running DICOMweb root to measure too (series stored by STOW-RS)",
    )
    parser.add_argument("--no-orthanc", action="store_true", help="do not start Orthanc")
    parser.add_argument("--no-compacs", action="store_true", help="do not start compacs")
    parser.add_argument(
        "--settle",
        type=float,
        default=120.0,
        metavar="S",
        help="wait up to S s for a --server to compress what STOW-RS stored",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="frame-rate rounds, the servers taking turns in each; medians reported",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    common.add_wait_quiet(parser)
    args = parser.parse_args()
    servers: list[tuple[str, str]] = []
    for spec in args.server:
        label, sep, url = spec.partition("=")
        if not sep or not url.startswith("http://"):
            parser.error(f"--server {spec!r}: give LABEL=http://HOST:PORT/ROOT")
        servers.append((label, url))
    if args.no_orthanc and args.no_compacs and not servers:
        parser.error("--no-orthanc --no-compacs needs at least one --server")
    common.handle_signals()
    stamp, tmp = common.make_tmp("dicomweb")
    try:
        progress(f"writing {args.count} CT instances")
        series, files = make_series(tmp, args.count)
        results: list[Result] = []
        pairs: list[tuple[DicomWebServer, Result]] = []
        versions = []
        procs: list[peers.ManagedProcess] = []
        if not args.no_orthanc:
            peers.ensure_debian_packages()
            proc = peers.OrthancProcess(
                tmp / "orthanc",
                ingest_transcoding=JPEG_LS_LOSSLESS,
                extra_config=orthanc_dicomweb_config(),
            ).start()
            procs.append(proc)
            plugins = proc.get_json("/plugins/dicom-web")
            versions.append(
                f"Orthanc {proc.get_json('/system')['Version']}, "
                f"DICOMweb plugin {plugins.get('Version')}"
            )
            server = orthanc_server(proc)
            progress(f"storing into orthanc ({server.root})")
            server.store(files)
            res = measure(server, series, args.repeat, 0.0, args.wait_quiet)
            results.append(res)
            pairs.append((server, res))
        if not args.no_compacs:
            web_port = peers.free_port()
            node = peers.CompacsProcess(
                tmp / "compacs" / "data", extra_args=["--web-port", str(web_port)]
            ).start()
            procs.append(node)
            url = f"http://127.0.0.1:{web_port}/dicomweb"
            server = DicomWebServer("compacs", url, lambda fs, url=url: stow(url, fs))
            progress(f"storing into compacs ({url}) with STOW-RS")
            server.store(files)
            # compacs acknowledges before it compresses: measure the JPEG-LS series, as
            # Orthanc's (transcoded at ingest), not one changing under the requests
            wait_compressed(node, len(files), args.settle)
            res = measure(server, series, args.repeat, args.settle, args.wait_quiet)
            results.append(res)
            pairs.append((server, res))
        for label, url in servers:
            server = DicomWebServer(label, url, lambda fs, url=url: stow(url, fs))
            progress(f"storing into {label} ({url}) with STOW-RS")
            server.store(files)
            res = measure(server, series, args.repeat, args.settle, args.wait_quiet)
            results.append(res)
            pairs.append((server, res))
        try:
            frame_rates(pairs, series, args.rounds, args.wait_quiet)
        finally:
            for proc in procs:
                if isinstance(proc, peers.CompacsProcess):
                    proc.stop()
                else:
                    proc.kill9()
        png = common.RESULTS_DIR / f"dicomweb-{stamp}.png"
        common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(results, png)
        lines = [
            "# DICOMweb benchmark",
            "",
            f"Machine: {common.machine()}",
            f"Command: {common.command_line()}",
            *[f"Server: {v}" for v in versions],
            "",
            *table(results, args.count),
            "",
            f"Plot: `{png.relative_to(common.ROOT)}`",
            "",
        ]
        common.write_report("dicomweb", stamp, lines)
        print("\n".join(lines))
    finally:
        common.cleanup(tmp, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
