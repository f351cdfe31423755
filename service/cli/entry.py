"""The `compacs` command: serve, stats, export, verify, codec, rules, send, query, pull.

Every mistake a user can make on the command line or in the config ends in one line on
stderr saying what was wrong and what to do, and exit status 2; a check that finds
problems (verify) exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from compacs.service.cli.archive_commands import (
    add_db_command,
    add_node_commands,
    add_problem_commands,
)
from compacs.service.cli.codec_commands import add_codec_commands
from compacs.service.cli.common import UsageError
from compacs.service.cli.scu_commands import add_scu_commands
from compacs.service.cli.tier_commands import add_tier_commands
from compacs.service.config import ConfigError
from compacs.service.logs import quiet_decoder_tracebacks

VERBOSE_HELP = "debug logging, and a traceback with any error"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_decoder_tracebacks()


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
    """Every command, in the order `compacs --help` lists them."""
    parser = argparse.ArgumentParser(prog="compacs", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_node_commands(sub)
    add_tier_commands(sub)
    add_db_command(sub)
    add_codec_commands(sub)
    add_scu_commands(sub)
    add_problem_commands(sub)
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
