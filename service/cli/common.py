"""What every command group of the CLI shares: the user-mistake exception that ends in one
line and exit status 2, the config of a command's --config/--data, opening the archive
service, and reading a DICOM file named on the command line."""

from __future__ import annotations

import argparse
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compacs.service.config import NodeConfig, load_config

if TYPE_CHECKING:
    from pydicom import Dataset

    from compacs.service.archive_service import ArchiveService


class UsageError(Exception):
    """A mistake by the user, reported without a traceback."""


def config_of(args: argparse.Namespace, **overrides: Any) -> NodeConfig:
    """The config a command runs on: --config, with --data and `overrides` over it."""
    data = getattr(args, "data", None)
    return load_config(getattr(args, "config", None), overrides={"data_dir": data, **overrides})


def open_service(config: NodeConfig) -> ArchiveService:
    """The archive service of the config's data folder, without compression jobs."""
    from compacs.service.archive_service import ArchiveService, NoArchive
    from compacs.service.storage.index import IndexUnavailable
    from compacs.service.storage.schema import IndexOutOfDate

    try:
        return ArchiveService.open(config)
    except (NoArchive, IndexOutOfDate, IndexUnavailable) as exc:
        raise UsageError(str(exc)) from exc


def data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see deploy/compacs.example.toml)")
    p.add_argument("--data", help="data folder (default ./compacs-data, or $COMPACS_DATA)")


def read_dicom(path: Path) -> tuple[bytes, Dataset]:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        raw = path.read_bytes()
        return raw, dcmread(BytesIO(raw))
    except (OSError, InvalidDicomError) as exc:
        raise UsageError(f"{path}: cannot read a DICOM file: {exc}") from exc


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
