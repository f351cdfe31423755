"""The value checks every config table shares: each names the file, the table and the key, and
says what is allowed (a bad config line is a user's error, told in one line).
"""

from __future__ import annotations

from typing import Any

from compacs.service.config_tables import ConfigError


def check_ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value:
        raise ConfigError(
            f"{where}: AE title must be 1-16 characters without backslash, got {value!r}"
        )
    if not all(32 <= ord(c) < 127 for c in value):
        raise ConfigError(f"{where}: AE title must be printable ASCII, got {value!r}")
    return value.strip()


# The index URL schemes compacs opens (SQLAlchemy dialect+driver); psycopg is psycopg 3,
# the [postgres] extra. "postgres://" (Heroku's spelling) is not one SQLAlchemy knows.
def as_bool(value: Any, where: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")  # from an environment variable
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def int_in(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: must be an integer from {lo} to {hi}, got {value!r}")
    return value


def number_in(value: Any, where: str, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def known_keys(table: str, raw: Any, allowed: Any, source: str) -> None:
    """`raw` is a [table] whose keys are all among `allowed`; else the error names the file,
    the table, the keys and what is allowed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{table}] must be a table")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{source}: [{table}] has unknown key(s) {', '.join(unknown)}; "
            f"allowed keys: {', '.join(allowed)}"
        )
