"""The `compacs` command: serve, stats, export, verify, codec, rules, send, query, pull.

Every mistake a user can make on the command line or in the config ends in one line on
stderr saying what was wrong and what to do, and exit status 2; a check that finds
problems (verify) exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compacs.service.config import ConfigError, NodeConfig, load_config

if TYPE_CHECKING:
    from compacs.service.dimse.scu import Peer

log = logging.getLogger("compacs")


class UsageError(Exception):
    """A mistake by the user, reported without a traceback."""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_decoder_tracebacks()


def quiet_decoder_tracebacks() -> None:
    """pydicom logs a traceback for every decoder plugin that fails on a frame, before it
    raises; compacs reports that failure itself in one line (and flags the object)."""
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)


def _config(args: argparse.Namespace, **overrides: Any) -> NodeConfig:
    data = getattr(args, "data", None)
    return load_config(getattr(args, "config", None), overrides={"data_dir": data, **overrides})


def _open_service(args: argparse.Namespace):  # noqa: ANN202
    """The archive service of the --data folder, without compression jobs."""
    from compacs.service.archive_service import ArchiveService, NoArchive
    from compacs.service.storage.index import IndexUnavailable
    from compacs.service.storage.schema import IndexOutOfDate

    config = _config(args)
    try:
        return ArchiveService.open(config)
    except (NoArchive, IndexOutOfDate, IndexUnavailable) as exc:
        raise UsageError(str(exc)) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    from compacs.service import logs
    from compacs.service.node import Node, NodeStartError
    from compacs.service.storage.index import IndexUnavailable
    from compacs.service.storage.schema import IndexOutOfDate

    config = _config(
        args,
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        metrics_port=args.metrics_port,
        web_port=args.web_port,
    )
    logs.configure(config.logging.format, "DEBUG" if args.verbose else config.logging.level)
    try:
        node = Node(config)
    except (IndexOutOfDate, IndexUnavailable, NodeStartError) as exc:
        raise UsageError(str(exc)) from exc
    node.run_until_signalled()
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """One line, exit 0 healthy or 1 (a container's HEALTHCHECK reserves 2: a config
    mistake is reported as unhealthy too, with what to fix)."""
    from compacs.service import health

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the line says it all
    try:
        config = _config(args, host=args.host, port=args.port, ae_title=args.ae_title)
    except ConfigError as exc:
        print(f"unhealthy: config: {exc}")
        return 1
    checks = health.run_checks(config, int(args.min_free_gb * 1e9), args.timeout)
    print(health.summary(checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Bring the index's schema to this compacs' revision (the only command that changes an
    existing index's schema: `serve` creates an empty one, and refuses an older one)."""
    from compacs.service.archive_service import redact
    from compacs.service.storage.index import IndexUnavailable, open_engine
    from compacs.service.storage.schema import backfill_pending, current_revision, migrate

    config = _config(args)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    url = config.effective_index_url
    try:
        engine = open_engine(url, f"{config.source}: index {redact(url)}", node_settings=False)
    except IndexUnavailable as exc:
        raise UsageError(str(exc)) from exc
    try:
        before = current_revision(engine)
        migrate(engine)
        after = current_revision(engine)
        pending = backfill_pending(engine)
    finally:
        engine.dispose()
    if before == after:
        print(f"index {redact(url)} is at revision {after}, the newest: nothing to do")
    else:
        print(f"index {redact(url)} upgraded from revision {before or '(empty)'} to {after}")
    if pending:
        _backfill(config, url)
    return 0


def _backfill(config: NodeConfig, url: str) -> None:
    """The studies of an index upgraded past 0007 read their patient attributes from their
    objects (service/backfill.py); a second run continues a stopped one."""
    from compacs.service.archive_service import ArchiveService
    from compacs.service.backfill import backfill_patients
    from compacs.service.storage.archive import Archive
    from compacs.service.storage.index import Index

    root = config.data_dir / "archive"
    if not root.is_dir():
        raise UsageError(
            f"{config.data_dir}: no compacs archive here (expected {root}), and the index's "
            "studies need their objects to finish the upgrade; give the --data folder that "
            "`compacs serve` used"
        )
    service = ArchiveService(config, Archive(root), Index.open(url, check=None))
    try:
        read, unreadable = backfill_patients(service)
    finally:
        service.close()
    print(f"patient attributes read for {read} studies ({unreadable} unreadable: see the log)")


def cmd_stats(args: argparse.Namespace) -> int:
    stats = _open_service(args).index.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(
        f"instances {stats['instances']}  studies {stats['studies']}  pending {stats['pending']}"
        f"  parked {stats['parked']}  flagged {stats['flagged']}"
    )
    if stats["patient_id_conflicts"]:
        print(
            f"patient_id_conflict {stats['patient_id_conflicts']} (PatientIDs whose studies "
            "disagree on the name or birth date; `compacs problems` lists them)"
        )
    if stats["patient_unverified_studies"]:
        print(
            f"patient_unverified {stats['patient_unverified_studies']} (studies whose patient "
            "attributes no stored object could confirm at the 0007 upgrade; `compacs problems` "
            "lists them)"
        )
    if stats["parked"] or stats["flagged"]:
        print("(parked: compression failed; flagged: kept as received, non-conformant;")
        print(" `compacs problems` lists them with the reasons)")
    print(
        f"received {_mb(stats['bytes_received'])}  stored {_mb(stats['bytes_stored'])}  "
        f"ratio {stats['ratio'] or '-'}"
    )
    for title, key in (("modality", "by_modality"), ("codec", "by_codec")):
        print(f"\n{title:<12} {'instances':>10} {'received':>12} {'stored':>12} {'ratio':>7}")
        for name, row in stats[key].items():
            print(
                f"{name:<12} {row['instances']:>10} {_mb(row['bytes_received']):>12} "
                f"{_mb(row['bytes_stored']):>12} {row['ratio'] or '-':>7}"
            )
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_export(args: argparse.Namespace) -> int:
    from pydicom.uid import UID

    from compacs.service.maintenance import AS_STORED, export

    if (
        args.transfer_syntax not in (None, AS_STORED)
        and not UID(args.transfer_syntax).is_transfer_syntax
    ):
        raise UsageError(
            f"--transfer-syntax {args.transfer_syntax}: not a DICOM transfer syntax UID; give "
            "e.g. 1.2.840.10008.1.2.1 (explicit VR little endian, the default), or "
            f"{AS_STORED} (the stored bytes as they are)"
        )
    service = _open_service(args)
    instances = service.index.instances(study_uid=args.study, series_uid=args.series)
    if not instances:
        raise UsageError(
            "nothing to export: no instance matches"
            if not args.all
            else "nothing to export: the archive is empty"
        )
    report = export(service, instances, args.out, args.transfer_syntax)
    for kept in report.as_stored:
        print(f"AS STORED {kept}")
    for failure in report.failures:
        print(f"FAILED {failure}")
    as_stored = f" ({len(report.as_stored)} as stored)" if report.as_stored else ""
    print(
        f"exported {len(report.written)} instance(s){as_stored} to {args.out}, "
        f"{len(report.failures)} failed"
    )
    return 1 if report.failures else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from compacs.service.maintenance import verify

    service = _open_service(args)
    failures = verify(service)
    for line in failures:
        print(line)
    count = len(service.index.instances())
    acked = sum(
        p.acknowledged is not None
        for p in [*service.index.problems(), *service.index.patient_problems()]
    )
    print(
        f"verified {count} instance(s): {len(failures)} problem(s)"
        + (f", {acked} acknowledged (`compacs problems` lists them)" if acked else "")
    )
    return 1 if failures else 0


def _tier_service(args: argparse.Namespace):  # noqa: ANN202
    import os
    import socket

    service = _open_service(args)
    if not service.config.tiers:
        raise UsageError(
            f"{service.config.source}: no [[tiers]] in the config: nothing to move (see "
            "deploy/compacs.example.toml)"
        )
    service.owner = f"{socket.gethostname()}:cli:{os.getpid()}"  # not a node's claims
    return service


def cmd_tier_run(args: argparse.Namespace) -> int:
    """Run the due tier moves once (what the node's scheduler runs), with a progress bar;
    Ctrl-C stops after the current move, and the next run goes on from there."""
    from datetime import UTC, datetime

    service = _tier_service(args)
    now = None
    if args.as_of:
        try:
            now = datetime.fromisoformat(args.as_of)
        except ValueError as exc:
            raise UsageError(f"--as-of {args.as_of!r}: give a date, e.g. 2027-03-01") from exc
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
    try:
        removed = service.remove_leftovers()  # what a killed earlier run left half-written
        if removed:
            print(f"removed {removed} file(s) an interrupted run left")
        report = service.tier_run(now, progress=True)
    finally:
        service.close()
    for line in report.failed:
        print(f"FAILED {line}")
    print(f"tier run: {report.line()}")
    return 1 if report.failed else 0


def cmd_tier_fixity(args: argparse.Namespace) -> int:
    service = _open_service(args)
    try:
        report = service.fixity_run(limit=args.limit, progress=True)
    finally:
        service.close()
    for line in report.failed:
        print(f"FIXITY FAILURE {line}")
    print(f"fixity: {report.checked} blob(s) checked, {len(report.failed)} failed")
    return 1 if report.failed else 0


def cmd_tier_status(args: argparse.Namespace) -> int:
    """Per tier: what it holds and what was saved; what is due now; fixity; the last run."""
    from compacs.service.tiering import moves

    service = _open_service(args)
    try:
        stats = service.index.stats()
        backlog: dict[str, int] = {}
        for move in moves.plan(service, moves.utcnow(), limit=10**9):
            backlog[move.tier.name] = backlog.get(move.tier.name, 0) + len(move.rows)
        fixity = service.index.fixity_summary()
        last = service.index.last_audit("tier_run")
        failures = service.index.fixity_failures()
    finally:
        service.close()
    tiers = ["hot", *(t.name for t in service.config.tiers)]
    if args.json:
        print(json.dumps(
            {"tiers": stats["by_tier"], "backlog": backlog, "fixity": fixity,
             "fixity_failures": failures, "last_run": last}, indent=2, default=str,
        ))  # fmt: skip
        return 1 if failures else 0
    print(
        f"{'tier':<10} {'instances':>10} {'received':>12} {'stored':>12} {'saved':>12} {'due':>8}"
    )
    for name in tiers:
        row = stats["by_tier"].get(name, {"instances": 0, "bytes_received": 0, "bytes_stored": 0})
        saved = row["bytes_received"] - row["bytes_stored"]
        print(
            f"{name:<10} {row['instances']:>10} {_mb(row['bytes_received']):>12} "
            f"{_mb(row['bytes_stored']):>12} {_mb(saved):>12} {backlog.get(name, 0):>8}"
        )
    print(
        f"\nfixity: {fixity['checked']} of {fixity['blobs']} blob(s) checked, "
        f"{fixity['failed']} failed; oldest check {fixity['oldest_check'] or 'never'}"
    )
    for tier, path, error in failures:
        print(f"FIXITY FAILURE {tier}/{path}: {error}")
    print(f"last tier run: {last or 'never'}")
    return 1 if failures else 0


def cmd_codec_list(args: argparse.Namespace) -> int:
    from compacs.codecs import registry

    codecs = [*registry.all_codecs(), *map(registry.get_volume, registry.volume_names())]
    print(f"{'name':<12} {'transfer syntax':<26} {'lossless':<9} {'available':<10} description")
    for codec in codecs:
        print(
            f"{codec.name:<12} {codec.transfer_syntax_uid or '(as received)':<26} "
            f"{'yes' if codec.lossless else 'no':<9} {'yes' if codec.is_available() else 'no':<10} "
            f"{codec.description}"
        )
    missing = [codec for codec in codecs if not codec.is_available()]
    if missing:
        print("\nnot available (a rule naming one of these goes on to its next codec):")
        for codec in missing:
            print(f"{codec.name}: {codec.unavailable_reason()}")
    return 0


def _read_dicom(path: Path):  # noqa: ANN202
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        raw = path.read_bytes()
        return raw, dcmread(BytesIO(raw))
    except (OSError, InvalidDicomError) as exc:
        raise UsageError(f"{path}: cannot read a DICOM file: {exc}") from exc


def _params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r}: write it as key=value")
        params[key] = int(value) if value.lstrip("-").isdigit() else value
    return params


def cmd_codec_encode(args: argparse.Namespace) -> int:
    from compacs.codecs import registry
    from compacs.service.compress import compress
    from compacs.service.rules import CodecChoice

    name = args.codec
    try:
        codec = registry.get_volume(name) if name in registry.volume_names() else registry.get(name)
        params = _params(args.param)
        codec.check_params(params)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--codec {name}: {exc.args[0]}") from exc
    if name in registry.volume_names():
        return _volume_encode(codec, params, args.input, args.output)
    raw, ds = _read_dicom(args.input)
    outcome = compress(raw, ds, [CodecChoice(codec.name, params)])
    if outcome.codec != codec.name and codec.transfer_syntax_uid:
        raise UsageError(f"{args.input}: {codec.name} not applied: {'; '.join(outcome.notes)}")
    args.output.write_bytes(outcome.data)
    derived = outcome.derived
    checked = (
        "verified bit-exact"
        if derived is None
        else f"LOSSY: max |error| {derived.max_error} (bound {derived.bound}), a new instance "
        f"{derived.sop_instance_uid} derived from {derived.source_sop_instance_uid}"
    )
    print(
        f"{args.output}: {codec.name}, {len(raw)} -> {len(outcome.data)} bytes "
        f"(ratio {len(raw) / len(outcome.data):.2f}), {checked}"
    )
    return 0


def _volume_encode(codec: Any, params: dict[str, Any], source: Path, output: Path) -> int:
    """A volume codec on a multi-frame file (out: a Part-10 file in its private syntax, which
    `codec decode` reads back) or on a folder holding one series (out: a series volume blob,
    the form a cold tier keeps it in); verified bit-exact either way."""
    from compacs.codecs.base import PixelFormat
    from compacs.codecs.volume import encode_verified
    from compacs.service.compress import part10, source_frames, with_frames
    from compacs.service.tiering import recompress, volumes

    paths = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    datasets = [_read_dicom(p)[1] for p in paths]
    if not datasets or any("PixelData" not in ds for ds in datasets):
        raise UsageError(f"{source}: give a multi-frame image, or a folder of one series' slices")
    received = sum(p.stat().st_size for p in paths)
    if len(datasets) == 1:
        frames = source_frames(datasets[0])
    else:
        if len({str(ds.SeriesInstanceUID) for ds in datasets}) != 1:
            raise UsageError(f"{source}: the files are of more than one series")
        order = recompress.slice_order(datasets)
        datasets = [datasets[i] for i in order]
        frames = [f for ds in datasets for f in source_frames(ds)]
    fmt = PixelFormat.from_dataset(datasets[0])
    reason = codec.unsupported_reason(fmt) or codec.data_unsupported_reason(frames, fmt)
    if len(frames) < 2:
        reason = "a single frame: a volume codec needs a multi-frame image or a series"
    if reason:
        raise UsageError(f"{source}: {codec.name} does not take it: {reason}")
    stream = encode_verified(codec, frames, fmt, **params)
    if len(datasets) == 1:
        data = part10(with_frames(datasets[0], codec, [stream], fmt))
    else:
        data, _spans = volumes.pack(stream, [volumes.header_of(ds) for ds in datasets])
    output.write_bytes(data)
    print(
        f"{output}: {codec.name}, {len(frames)} frames, {received} -> {len(data)} bytes "
        f"(ratio {received / len(data):.2f}), verified bit-exact"
    )
    return 0


def cmd_codec_decode(args: argparse.Namespace) -> int:
    from compacs.service.transcode import TranscodeError, transcode

    raw, _ds = _read_dicom(args.input)
    try:
        out = transcode(raw, args.transfer_syntax)
    except TranscodeError as exc:
        raise UsageError(f"{args.input}: {exc}") from exc
    args.output.write_bytes(out)
    print(f"{args.output}: {len(out)} bytes, transfer syntax {args.transfer_syntax}")
    return 0


def cmd_rules_explain(args: argparse.Namespace) -> int:
    from compacs.codecs.base import PixelFormat
    from compacs.service.compress import kept_as_received
    from compacs.service.rules import explain, object_attributes

    config = _config(args)
    _raw, ds = _read_dicom(args.file)
    fmt = PixelFormat.from_dataset(ds) if "PixelData" in ds else None
    attrs = object_attributes(ds, args.calling_ae)
    print(f"rules from {config.source}")
    for line in explain(config.rules, attrs, fmt, kept_as_received(ds)):
        print(line)
    if fmt is not None and fmt.number_of_frames > 1:
        for line in _volume_explain(ds, fmt):
            print(line)
    return 0


def _volume_explain(ds: Any, fmt: Any) -> list[str]:
    """For a multi-frame image: whether each volume codec (for tiers) could take it, and why
    not (a value span its bit depths cannot hold, a geometry it refuses)."""
    from compacs.codecs import registry
    from compacs.service.compress import source_frames

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


# --- SCU commands: send, query, pull (the DICOM work is in service/scu.py) ---------------
def _scu_peer(value: str, option: str):  # noqa: ANN202
    from compacs.service.dimse.scu import AddressError, parse_peer

    try:
        return parse_peer(value, option)
    except AddressError as exc:
        raise UsageError(str(exc)) from exc


def _scu_tls(peer: Peer, args: argparse.Namespace) -> Peer:
    """`peer` reached with DICOM TLS when --tls (or a --tls-* file) is given."""
    import dataclasses

    from compacs.service.dimse.tls import TlsSetupError, client_context

    files = (args.tls_certificate, args.tls_key, args.tls_ca_bundle)
    if not args.tls and not any(files):
        return peer
    try:
        return dataclasses.replace(peer, tls=client_context(*files))
    except TlsSetupError as exc:
        raise UsageError(f"{exc.key}: {exc}") from exc


def _scu_calling_ae(args: argparse.Namespace, default: str | None = None) -> str:
    from compacs.service.dimse.scu import AddressError, check_ae_title

    value = args.from_ae or default or load_config(None).ae_title
    try:
        return check_ae_title(value, "--from-ae")
    except AddressError as exc:
        raise UsageError(str(exc)) from exc


def cmd_send(args: argparse.Namespace) -> int:
    from compacs.service.dimse.scu import ScuError, send_files

    peer = _scu_tls(_scu_peer(args.to, "--to"), args)
    calling = _scu_calling_ae(args)
    try:
        report = send_files(args.paths, peer, calling)
    except ScuError as exc:
        raise UsageError(str(exc)) from exc
    if not report.results:
        raise UsageError(f"no DICOM file to send among {', '.join(map(str, args.paths))}")
    for result in report.failed:
        print(f"FAILED {result.path}: {result.describe()}")
    print(
        f"sent {report.sent} file(s) to {peer} ({report.warnings} with a warning), "
        f"failed {len(report.failed)}, skipped {len(report.skipped)} (not DICOM)"
    )
    return 1 if report.failed else 0


def cmd_query(args: argparse.Namespace) -> int:
    from compacs.service.dimse.scu import DEFAULT_KEYS, ScuError, answer_value, find, parse_key

    peer = _scu_tls(_scu_peer(args.peer, "--from"), args)
    calling = _scu_calling_ae(args)
    level = args.level.upper()
    try:
        asked = [parse_key(item) for item in args.key]
        keys = dict.fromkeys(DEFAULT_KEYS[level])
        keys.update(asked)
        answers = find(peer, calling, level, list(keys.items()), args.model)
    except ScuError as exc:
        raise UsageError(str(exc)) from exc
    rows = [{k: answer_value(ds, k) for k in keys} for ds in answers]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0

    def cell(value: Any) -> str:
        return "\\".join(value) if isinstance(value, list) else ("" if value is None else value)

    table = [list(keys), *([cell(row[k]) for k in keys] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    print(f"{len(rows)} match(es) at {peer}", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from compacs.service.dimse.scu import ScuError, pull

    peer = _scu_tls(_scu_peer(args.peer, "--from"), args)
    if args.into:
        into = _scu_peer(args.into, "--into")
    else:
        from compacs.service.dimse.scu import Peer

        config = load_config(args.config)
        if not config.tls.plain_port:
            raise UsageError(
                f"{config.source}: [tls] plain_port = false: this node has no plain port to "
                "pull into; give --into AE@HOST:PORT (--into is reached without TLS)"
            )
        into = Peer(config.ae_title, "127.0.0.1", config.port)
    calling = _scu_calling_ae(args, default=into.ae_title)
    try:
        report = pull(peer, calling, args.study, into, args.via)
    except ScuError as exc:
        raise UsageError(str(exc)) from exc
    for line in report.forward_failures:
        print(f"FAILED to store in {into}: {line}")
    how = f"C-MOVE to {into.ae_title}" if args.via == "move" else f"C-GET, stored in {into}"
    print(
        f"pulled study {args.study} from {peer} ({how}): {report.completed} completed, "
        f"{report.failed} failed, {report.warning} warning"
        + (f", expected {report.expected}" if report.expected is not None else "")
    )
    if report.completed + report.failed + report.warning == 0:
        print(f"nothing was retrieved: does {peer} hold the study's objects?", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


def _add_scu_commands(sub: Any) -> None:
    def scu_options(p: argparse.ArgumentParser, *, peer: str, flag: str, helptext: str) -> None:
        p.add_argument(flag, dest=peer, required=True, metavar="AE@HOST:PORT", help=helptext)
        p.add_argument("--from-ae", help="our (calling) AE title (default: the node's AE title)")
        tls = p.add_argument_group(
            "DICOM TLS (TLS 1.2+, BCP 195 cipher suites) to the peer of " + flag
        )
        tls.add_argument("--tls", action="store_true", help="use DICOM TLS (implied by --tls-*)")
        tls.add_argument(
            "--tls-ca-bundle",
            type=Path,
            metavar="PEM",
            help="CAs the peer's certificate must chain to (default: the system's); the "
            "certificate must also name the host",
        )
        tls.add_argument(
            "--tls-certificate",
            type=Path,
            metavar="PEM",
            help="our certificate, for peers that require one",
        )
        tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key, unencrypted")

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    scu_options(p, peer="to", flag="--to", helptext="the peer to send to")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("query", help="C-FIND at a DICOM peer, answers as a table or JSON")
    scu_options(p, peer="peer", flag="--from", helptext="the peer to query")
    p.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="match on VALUE (wildcards *, ?; date ranges A-B), or just ask for KEY",
    )
    p.add_argument(
        "--level",
        default="STUDY",
        type=str.upper,
        choices=["PATIENT", "STUDY", "SERIES", "IMAGE"],
        help="query level (default STUDY)",
    )
    p.add_argument(
        "--model", default="study", choices=["study", "patient"], help="information model"
    )
    p.add_argument("--json", action="store_true", help="answers as a JSON list")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("pull", help="import a study from another PACS into this node")
    scu_options(p, peer="peer", flag="--from", helptext="the PACS that holds the study")
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument(
        "--via",
        default="move",
        choices=["move", "get"],
        help="move: the PACS sends to --into (it must know that AE); get: we fetch and forward",
    )
    p.add_argument(
        "--into",
        metavar="AE@HOST:PORT",
        help="where the study goes (default: this node, its AE title at 127.0.0.1 and port)",
    )
    p.add_argument("--config", type=Path, help="TOML config file (for the default --into)")
    p.set_defaults(func=cmd_pull)


def cmd_problems(args: argparse.Namespace) -> int:
    """List parked and flagged objects and patient-ID conflicts with their reasons, and blobs
    that failed fixity; or (`ack`) acknowledge objects and conflicts."""
    from compacs.service import problems
    from compacs.service.storage.index import PatientProblem, patient_label

    service = _open_service(args)
    try:
        if args.problems_command == "ack":
            args.by = args.by or problems.who()
            try:
                acked = problems.acknowledge(
                    service.index, args.uids, args.study, args.all, args.by, args.note,
                    args.patient, args.issuer,
                )  # fmt: skip
            except problems.SelectionError as exc:
                raise UsageError(f"problems ack: {exc}") from exc
            for problem in acked:
                if isinstance(problem, PatientProblem):
                    print(f"acknowledged {patient_label(problem)}: {problem.reason}")
                else:
                    print(f"acknowledged SOP {problem.sop_instance_uid}: {problem.text}")
            print(f"{len(acked)} problem(s) acknowledged by {args.by}")
            return 0
        found = service.index.problems()
        conflicts = service.index.patient_problems()
        fixity = service.index.fixity_failures()
        unverified = service.index.patient_unverified_studies()
    finally:
        service.close()
    if args.json:
        print(json.dumps({
            "objects": [problems.as_json(p) for p in found],
            "patient_id_conflicts": [problems.patient_as_json(c) for c in conflicts],
            "fixity_failures": [{"tier": t, "blob": b, "error": e} for t, b, e in fixity],
            "patient_unverified_studies": [
                {"study_instance_uid": u, "patient_id": i, "patient_name": n}
                for u, i, n in unverified
            ],
        }, indent=2))  # fmt: skip
        return 0
    if found:
        print("\n".join(problems.table(found)))
    if conflicts:
        print("PatientIDs whose studies disagree on the name or birth date (each study answers")
        print("with its own; acknowledge with `compacs problems ack --patient ID`):")
        print("\n".join(problems.patient_table(conflicts)))
    if fixity:
        print("blobs whose last fixity check failed (restore them; never acknowledged):")
        print("\n".join(f"  {path} (tier {tier}): {error}" for tier, path, error in fixity))
    if unverified:
        print("studies whose patient attributes no stored object could confirm at the 0007")
        print("upgrade (they answer with what the older index kept, which may be another")
        print("study's patient: check each; a re-send with on_duplicate = replace corrects it):")
        for uid, patient_id, name in unverified:
            print(f"  {uid}  PatientID {patient_id or '(none)'}  {name or '(no name)'}")
    print(problems.summary(found, conflicts))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from compacs.service import problems

    args.by = args.by or problems.who()
    service = _open_service(args)
    try:
        count = problems.requeue(service.index, args.uids, args.study, args.all, args.by)
    except problems.SelectionError as exc:
        raise UsageError(f"requeue: {exc}") from exc
    finally:
        service.close()
    lease = service.config.ingest.lease_seconds
    print(
        f"{count} parked object(s) re-queued with their attempts reset: a running node takes "
        f"them within about {lease / 2:g} s, a stopped one at its next start"
    )
    return 0


def _add_problem_commands(sub: Any, data_options: Any) -> None:
    def selection(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("uids", nargs="*", metavar="SOP_UID", help=f"SOP Instance UIDs to {what}")
        p.add_argument(
            "--study", action="append", default=[], metavar="UID", help=f"{what} a whole study's"
        )
        p.add_argument("--all", action="store_true", help=f"{what} every one")
        p.add_argument("--by", help="recorded as who did it (default: USER@HOST)")

    p = sub.add_parser(
        "problems", help="list parked and flagged objects, patient-ID conflicts, with the reasons"
    )
    data_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_problems, problems_command=None)
    psub = p.add_subparsers(dest="problems_command", metavar="ACTION")
    a = psub.add_parser(
        "ack", help="acknowledge problems as they read now, so that `verify` passes them"
    )
    a.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config file")
    a.add_argument("--data", default=argparse.SUPPRESS, help="data folder (as for problems)")
    selection(a, "acknowledge")
    a.add_argument(
        "--patient",
        action="append",
        default=[],
        metavar="ID",
        help="acknowledge the patient-ID conflict of this PatientID (studies under it disagree "
        "on the name or birth date)",
    )
    a.add_argument(
        "--issuer",
        metavar="X",
        help="the IssuerOfPatientID of --patient, where its PatientID has conflicts under "
        "several ('' for none)",
    )
    a.add_argument("--note", help="why (kept in the index and the audit log)")

    p = sub.add_parser("requeue", help="send parked objects back to compression")
    data_options(p)
    selection(p, "re-queue")
    p.set_defaults(func=cmd_requeue)


# --- parser -----------------------------------------------------------------------------
VERBOSE_HELP = "debug logging, and a traceback with any error"


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand (whoever added it) its own -v, so that `compacs serve -v` works
    as `compacs -v serve` does. SUPPRESS as its default: a subcommand that is not given -v
    must leave the top-level one's value alone (argparse copies a subparser's defaults over
    the namespace)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
            if not any("--verbose" in a.option_strings for a in sub._actions):
                sub.add_argument(
                    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help=VERBOSE_HELP,
                )  # fmt: skip
            _verbose_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compacs", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, help="TOML config file (see deploy/compacs.example.toml)"
        )
        p.add_argument("--data", help="data folder (default ./compacs-data, or $COMPACS_DATA)")

    p = sub.add_parser("serve", help="run the DICOM node (C-ECHO, C-STORE)")
    data_options(p)
    p.add_argument("--host", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="DICOM port (default 11112, or $COMPACS_PORT)")
    p.add_argument("--ae-title", help="our AE title (default COMPACS, or $COMPACS_AE_TITLE)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port ([metrics] port, or $COMPACS_METRICS_PORT; 0: none)",
    )
    p.add_argument(
        "--web-port", type=int, help="DICOMweb and status page port ([web] port; 0: none)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "health", help="is the node healthy: C-ECHO to itself, index, archive, free disk"
    )
    data_options(p)
    p.add_argument("--host", help="the node's listen address (default: its config's)")
    p.add_argument("--port", type=int, help="the node's DICOM port (default: its config's)")
    p.add_argument("--ae-title", help="the node's AE title (default: its config's)")
    p.add_argument(
        "--min-free-gb", type=float, default=1.0, help="free disk below this is unhealthy (1)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per check (10)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("stats", help="instances, studies, bytes and ratios of the archive")
    data_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export", help="write stored objects as Part-10 files")
    data_options(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID")
    which.add_argument("--series", help="Series Instance UID")
    which.add_argument("--all", action="store_true", help="everything")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--transfer-syntax",
        default=None,
        help="transfer syntax UID of the files, or 'stored': the stored bytes as they are "
        "(objects in compacs' private syntaxes decoded); an object that cannot be given in "
        "it fails (the export goes on, exit 1). Default: explicit VR little endian, and an "
        "object whose pixel data does not decode is written as stored and listed (AS STORED)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check every blob's checksum and that it decodes")
    data_options(p)
    p.set_defaults(func=cmd_verify)

    tier = sub.add_parser("tier", help="move objects to colder tiers; fixity; status")
    tsub = tier.add_subparsers(dest="tier_command", required=True, metavar="ACTION")
    p = tsub.add_parser("run", help="run the due tier moves once, with a progress bar")
    data_options(p)
    p.add_argument("--as-of", help="judge what is due as if it were this date (YYYY-MM-DD)")
    p.set_defaults(func=cmd_tier_run)
    p = tsub.add_parser("status", help="per tier: objects, bytes saved, backlog; fixity")
    data_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tier_status)
    p = tsub.add_parser("fixity", help="re-read and check the blobs due for a check, once")
    data_options(p)
    p.add_argument("--limit", type=int, default=1000, help="blobs at most (default 1000)")
    p.set_defaults(func=cmd_tier_fixity)

    db = sub.add_parser("db", help="the index's schema")
    dsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "upgrade", help="bring the index to this compacs' schema (back it up first)"
    )
    data_options(p)
    p.set_defaults(func=cmd_db_upgrade)

    codec = sub.add_parser("codec", help="list codecs, or run one on a single file")
    csub = codec.add_subparsers(dest="codec_command", required=True, metavar="ACTION")
    p = csub.add_parser("list", help="registered codecs and whether they are available")
    p.set_defaults(func=cmd_codec_list)
    p = csub.add_parser("encode", help="encode IN.dcm with a codec (verified bit-exact)")
    p.add_argument(
        "--codec",
        required=True,
        help="codec name (see `compacs codec list`); a volume codec (hevc, learnvol) takes a "
        "multi-frame file, or a folder holding one series (written as a series volume)",
    )
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="codec parameter")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("output", type=Path, metavar="OUT")
    p.set_defaults(func=cmd_codec_encode)
    p = csub.add_parser("decode", help="decode IN.dcm to an uncompressed syntax")
    p.add_argument("--transfer-syntax", default="1.2.840.10008.1.2.1", help="target syntax UID")
    p.add_argument("input", type=Path, metavar="IN.dcm")
    p.add_argument("output", type=Path, metavar="OUT.dcm")
    p.set_defaults(func=cmd_codec_decode)

    rules = sub.add_parser("rules", help="inspect the compression rules")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    p = rsub.add_parser("explain", help="which rule and codec a file would get, and why")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--calling-ae", default="", help="pretend the file came from this AE title")
    p.add_argument("file", type=Path, metavar="FILE.dcm")
    p.set_defaults(func=cmd_rules_explain)
    _add_scu_commands(sub)
    _add_problem_commands(sub, data_options)
    _help_as_description(parser)
    return parser


def _help_as_description(parser: argparse.ArgumentParser) -> None:
    """`compacs CMD --help` opens with what CMD does (the line `compacs --help` lists for
    it), for every command and action, later ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for listed in action._choices_actions:
                command = action.choices[listed.dest]
                command.description = command.description or listed.help
                _help_as_description(command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _verbose_everywhere(parser)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        if args.verbose:  # the one line first names the cause; -v adds where it came from
            traceback.print_exc()
        print(f"compacs: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `compacs stats | head`
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
