"""The SCU commands: send, query, pull (the DICOM work is in dimse/scu/); here the
options, the progress bar the SCU's progress callback drives, and the answer table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compacs.service.cli.common import UsageError
from compacs.service.config import load_config

if TYPE_CHECKING:
    from tqdm import tqdm

    from compacs.service.dimse.scu import Peer, Step

# Keys shown by `compacs query` at each level when none are asked for.
DEFAULT_KEYS: dict[str, list[str]] = {
    "PATIENT": [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
    ],
    "STUDY": [
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyDescription",
        "ModalitiesInStudy",
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "StudyInstanceUID",
        "SeriesNumber",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": ["SeriesInstanceUID", "InstanceNumber", "SOPClassUID", "SOPInstanceUID"],
}


class _ProgressBar:
    """A send's or pull's progress as a bar on stderr, drawn only on a terminal, with its
    notes above it. A failure the command lists at the end is shown as it happens only
    where there is a bar (which would otherwise hide it until the end)."""

    def __init__(self, desc: str, unit: str) -> None:
        from tqdm import tqdm

        self._write = tqdm.write
        self.bar: tqdm = tqdm(desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)

    def __call__(self, step: Step) -> None:
        if step.note and not (step.failure and self.bar.disable):
            self._write(step.note, file=sys.stderr)
        if step.total is not None:
            self.bar.total = step.total
        self.bar.n = step.done
        self.bar.refresh()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.bar.close()


def _scu_peer(value: str, option: str) -> Peer:
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
        with _ProgressBar("send", "file") as bar:
            report = send_files(args.paths, peer, calling, progress=bar)
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
    from compacs.service.dimse.scu import ScuError, answer_value, find, parse_key

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
    from compacs.service.dimse.scu import Peer, ScuError, pull

    peer = _scu_tls(_scu_peer(args.peer, "--from"), args)
    if args.into:
        into = _scu_peer(args.into, "--into")
    else:
        config = load_config(args.config)
        if not config.tls.plain_port:
            raise UsageError(
                f"{config.source}: [tls] plain_port = false: this node has no plain port to "
                "pull into; give --into AE@HOST:PORT (--into is reached without TLS)"
            )
        into = Peer(config.ae_title, "127.0.0.1", config.port)
    calling = _scu_calling_ae(args, default=into.ae_title)
    try:
        with _ProgressBar("pull", "img") as bar:
            report = pull(peer, calling, args.study, into, args.via, progress=bar)
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


def add_scu_commands(sub: Any) -> None:
    """send, query, pull."""

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
