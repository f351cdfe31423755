"""The tier commands: run the due moves once, check fixity once, show each tier's state
(what the node's scheduler does on its own, for an administrator at the terminal)."""

from __future__ import annotations

import argparse
import json
import os
import socket
from typing import Any

from compacs.service.cli.common import UsageError, config_of, data_options, mb, open_service


def _tier_service(args: argparse.Namespace):  # noqa: ANN202
    config = config_of(args)
    service = open_service(config)
    if not config.tiers:
        raise UsageError(
            f"{config.source}: no [[tiers]] in the config: nothing to move (see "
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
    return _reported(report.failed, "FAILED", f"tier run: {report.line()}")


def cmd_tier_fixity(args: argparse.Namespace) -> int:
    service = open_service(config_of(args))
    try:
        report = service.fixity_run(limit=args.limit, progress=True)
    finally:
        service.close()
    summary = f"fixity: {report.checked} blob(s) checked, {len(report.failed)} failed"
    return _reported(report.failed, "FIXITY FAILURE", summary)


def _reported(failed: list[str], label: str, summary: str) -> int:
    """A run's failures a line each, its summary, and exit status 1 if any failed."""
    for line in failed:
        print(f"{label} {line}")
    print(summary)
    return 1 if failed else 0


def cmd_tier_status(args: argparse.Namespace) -> int:
    """Per tier: what it holds and what was saved; what is due now; fixity; the last run."""
    service = open_service(config_of(args))
    try:
        status = service.tier_status()
    finally:
        service.close()
    failures = status.fixity_failures
    if args.json:
        print(json.dumps(
            {"tiers": status.by_tier, "backlog": status.backlog, "fixity": status.fixity,
             "fixity_failures": failures, "last_run": status.last_run}, indent=2, default=str,
        ))  # fmt: skip
        return 1 if failures else 0
    print(
        f"{'tier':<10} {'instances':>10} {'received':>12} {'stored':>12} {'saved':>12} {'due':>8}"
    )
    for name in status.names:
        empty = {"instances": 0, "bytes_received": 0, "bytes_stored": 0}
        row = status.by_tier.get(name, empty)
        saved = row["bytes_received"] - row["bytes_stored"]
        print(
            f"{name:<10} {row['instances']:>10} {mb(row['bytes_received']):>12} "
            f"{mb(row['bytes_stored']):>12} {mb(saved):>12} {status.backlog.get(name, 0):>8}"
        )
    fixity = status.fixity
    print(
        f"\nfixity: {fixity['checked']} of {fixity['blobs']} blob(s) checked, "
        f"{fixity['failed']} failed; oldest check {fixity['oldest_check'] or 'never'}"
    )
    for tier, path, error in failures:
        print(f"FIXITY FAILURE {tier}/{path}: {error}")
    print(f"last tier run: {status.last_run or 'never'}")
    return 1 if failures else 0


def add_tier_commands(sub: Any) -> None:
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
