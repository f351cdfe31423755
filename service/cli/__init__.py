"""The `compacs` command, one module per command group:

- entry.py: `main`, the parser, logging set-up, and the one-line error for a user's mistake;
- common.py: what the groups share (UsageError, the config, opening the archive service);
- archive_commands.py: serve, health, db upgrade, stats, export, verify, problems, requeue;
- tier_commands.py: tier run, status, fixity;
- codec_commands.py: codec list, encode, decode; rules explain;
- scu_commands.py: send, query, pull (the DICOM work is in dimse/scu/), with progress bars.
"""

from compacs.service.cli.entry import build_parser, main

__all__ = ["build_parser", "main"]
