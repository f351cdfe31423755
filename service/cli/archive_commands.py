"""The commands about the node and its archive: serve, health, db upgrade, stats, export,
verify, problems (and problems ack), requeue."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from compacs.service.cli.common import (
    UsageError,
    config_of,
    data_options,
    mb,
    open_service,
)
from compacs.service.config import ConfigError, NodeConfig


def cmd_serve(args: argparse.Namespace) -> int:
    from compacs.service import logs
    from compacs.service.node import Node, NodeStartError
    from compacs.service.storage.index import IndexUnavailable
    from compacs.service.storage.schema import IndexOutOfDate

    config = config_of(
        args,
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        metrics_port=args.metrics_port,
        web_port=args.web_port,
        processes=args.processes,
    )
    several = config.effective_processes > 1
    level = "DEBUG" if args.verbose else config.logging.level
    logs.configure(config.logging.format, level, pid=several)
    if several:
        from compacs.service import processes

        try:
            return processes.serve(config)
        except (IndexOutOfDate, IndexUnavailable, NodeStartError) as exc:
            raise UsageError(str(exc)) from exc
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
        config = config_of(args, host=args.host, port=args.port, ae_title=args.ae_title)
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

    config = config_of(args)
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
    stats = open_service(config_of(args)).stats()
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
        f"received {mb(stats['bytes_received'])}  stored {mb(stats['bytes_stored'])}  "
        f"ratio {stats['ratio'] or '-'}"
    )
    for title, key in (("modality", "by_modality"), ("codec", "by_codec")):
        print(f"\n{title:<12} {'instances':>10} {'received':>12} {'stored':>12} {'ratio':>7}")
        for name, row in stats[key].items():
            print(
                f"{name:<12} {row['instances']:>10} {mb(row['bytes_received']):>12} "
                f"{mb(row['bytes_stored']):>12} {row['ratio'] or '-':>7}"
            )
    return 0


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
    service = open_service(config_of(args))
    instances = service.instances(study_uid=args.study, series_uid=args.series)
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

    service = open_service(config_of(args))
    failures = verify(service)
    for line in failures:
        print(line)
    count = len(service.instances())
    found = service.problems()
    acked = sum(p.acknowledged is not None for p in [*found.objects, *found.patient_conflicts])
    print(
        f"verified {count} instance(s): {len(failures)} problem(s)"
        + (f", {acked} acknowledged (`compacs problems` lists them)" if acked else "")
    )
    return 1 if failures else 0


def cmd_problems(args: argparse.Namespace) -> int:
    """List parked and flagged objects and patient-ID conflicts with their reasons, and blobs
    that failed fixity; or (`ack`) acknowledge objects and conflicts."""
    from compacs.service import problems
    from compacs.service.storage.index import PatientProblem, patient_label

    service = open_service(config_of(args))
    try:
        if args.problems_command == "ack":
            args.by = args.by or problems.who()
            try:
                acked = service.acknowledge(
                    args.uids, args.study, args.all, args.by, args.note, args.patient, args.issuer
                )
            except problems.SelectionError as exc:
                raise UsageError(f"problems ack: {exc}") from exc
            for problem in acked:
                if isinstance(problem, PatientProblem):
                    print(f"acknowledged {patient_label(problem)}: {problem.reason}")
                else:
                    print(f"acknowledged SOP {problem.sop_instance_uid}: {problem.text}")
            print(f"{len(acked)} problem(s) acknowledged by {args.by}")
            return 0
        found = service.problems()
    finally:
        service.close()
    if args.json:
        print(json.dumps({
            "objects": [problems.as_json(p) for p in found.objects],
            "patient_id_conflicts": [problems.patient_as_json(c) for c in found.patient_conflicts],
            "fixity_failures": [
                {"tier": t, "blob": b, "error": e} for t, b, e in found.fixity_failures
            ],
            "patient_unverified_studies": [
                {"study_instance_uid": u, "patient_id": i, "patient_name": n}
                for u, i, n in found.patient_unverified
            ],
        }, indent=2))  # fmt: skip
        return 0
    if found.objects:
        print("\n".join(problems.table(found.objects)))
    if found.patient_conflicts:
        print("PatientIDs whose studies disagree on the name or birth date (each study answers")
        print("with its own; acknowledge with `compacs problems ack --patient ID`):")
        print("\n".join(problems.patient_table(found.patient_conflicts)))
    if found.fixity_failures:
        print("blobs whose last fixity check failed (restore them; never acknowledged):")
        print(
            "\n".join(
                f"  {path} (tier {tier}): {error}" for tier, path, error in found.fixity_failures
            )
        )
    if found.patient_unverified:
        print("studies whose patient attributes no stored object could confirm at the 0007")
        print("upgrade (they answer with what the older index kept, which may be another")
        print("study's patient: check each; a re-send with on_duplicate = replace corrects it):")
        for uid, patient_id, name in found.patient_unverified:
            print(f"  {uid}  PatientID {patient_id or '(none)'}  {name or '(no name)'}")
    print(problems.summary(found.objects, found.patient_conflicts))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from compacs.service import problems

    args.by = args.by or problems.who()
    config = config_of(args)
    service = open_service(config)
    try:
        count = service.requeue(args.uids, args.study, args.all, args.by)
    except problems.SelectionError as exc:
        raise UsageError(f"requeue: {exc}") from exc
    finally:
        service.close()
    lease = config.ingest.lease_seconds
    print(
        f"{count} parked object(s) re-queued with their attempts reset: a running node takes "
        f"them within about {lease / 2:g} s, a stopped one at its next start"
    )
    return 0


def add_node_commands(sub: Any) -> None:
    """serve, health, stats, export, verify."""
    p = sub.add_parser(
        "serve",
        help="run the DICOM node (C-ECHO, C-STORE; C-FIND, C-GET, C-MOVE for the callers its "
        "[access] table allows)",
    )
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
    p.add_argument(
        "--processes",
        type=int,
        help="node processes accepting on the port ([node] processes, default 1; 0: one per "
        "core, up to 4)",
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


def add_db_command(sub: Any) -> None:
    db = sub.add_parser("db", help="the index's schema")
    dsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "upgrade", help="bring the index to this compacs' schema (back it up first)"
    )
    data_options(p)
    p.set_defaults(func=cmd_db_upgrade)


def add_problem_commands(sub: Any) -> None:
    """problems (and problems ack), requeue."""

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
