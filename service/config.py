"""Loading and validating the node's one TOML configuration file.

Precedence, lowest first: the embedded defaults (`defaults.toml` beside this module), the
file given with --config, environment variables (for containers), command-line flags.
Every mistake a user can make here is reported as a `ConfigError` naming the file, the key
and what is allowed, before the node opens a port. What loading returns, the typed tables,
lives in config_tables.py (its names are importable from here too); the shared value checks
in config_checks.py; the tables of the network faces ([tls], [metrics], [logging], [web]) in
config_sections.py.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from compacs.service.config_checks import (
    as_bool,
    check_ae_title,
    int_in,
    known_keys,
    number_in,
)
from compacs.service.config_sections import (
    parse_logging,
    parse_metrics,
    parse_tls,
    parse_web,
)
from compacs.service.config_tables import (
    DEFAULTS_NAME,
    OPEN_BY_DEFAULT,
    SERVICES,
    Access,
    ConfigError,
    IngestConfig,
    Limits,
    LoggingConfig,
    MetricsConfig,
    NodeConfig,
    StorageConfig,
    TieringConfig,
    TlsConfig,
)
from compacs.service.rules import parse_rules
from compacs.service.tiering.policy import parse_tiers

__all__ = [
    "DEFAULTS_NAME",
    "OPEN_BY_DEFAULT",
    "SERVICES",
    "Access",
    "ConfigError",
    "IngestConfig",
    "Limits",
    "LoggingConfig",
    "MetricsConfig",
    "NodeConfig",
    "StorageConfig",
    "TieringConfig",
    "TlsConfig",
    "load_config",
]

# Environment variable -> [node] key; values are parsed like the TOML value would be.
ENV_OVERRIDES = {
    "COMPACS_INDEX_URL": "index_url",
    "COMPACS_DATA": "data_dir",
    "COMPACS_PORT": "port",
    "COMPACS_AE_TITLE": "ae_title",
}

ON_DUPLICATE = ("keep_first", "replace")
TABLES = (
    "node", "move_destinations", "access", "ingest", "limits", "storage", "tiering", "tls",
    "metrics", "logging", "web",
)  # fmt: skip

# key -> (kind, minimum, maximum); the kinds TOML gives: bool, int, float (ints accepted)
_INGEST_KEYS: dict[str, tuple[type, float, float]] = {
    "strict": (bool, 0, 1),
    "accept_any_sop_class": (bool, 0, 1),
    "max_attempts": (int, 1, 1000),
    "retry_seconds": (float, 0.01, 86400),
    "lease_seconds": (float, 1, 86400),
    "compress_before_ack_from": (int, 0, 4096),
}
_TIERING_KEYS: dict[str, tuple[type, float, float]] = {
    "every_minutes": (float, 0, 7 * 24 * 60),
    "cpu_share": (float, 0.05, 1),
    "stable_minutes": (float, 0, 30 * 24 * 60),
    "fixity_every_hours": (float, 0, 365 * 24),
    "fixity_max_age_days": (float, 0, 3650),
}
_STORAGE_KEYS: dict[str, tuple[type, float, float]] = {
    "delete_grace_seconds": (float, 0, 30 * 86400),
}
_LIMIT_KEYS: dict[str, tuple[type, float, float]] = {
    "association_request_timeout": (float, 0.1, 3600),
    "idle_timeout": (float, 1, 86400),
    "pdu_read_timeout": (float, 0.1, 3600),
    "max_dataset_bytes": (int, 1 << 16, 1 << 40),
    "spool_dataset_bytes": (int, 1 << 16, 1 << 40),
    "max_associations": (int, 1, 4096),
    "max_associations_per_ae": (int, 1, 4096),
    "max_associations_per_address": (int, 1, 4096),
    "max_pending_per_address": (int, 1, 4096),
}


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


INDEX_SCHEMES = (
    "sqlite",
    "postgresql+psycopg",
    "postgresql",
    "postgresql+psycopg2",
)
INDEX_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER@HOST[:PORT]/DATABASE"


def _check_index_url(url: str, where: str) -> None:
    """An empty URL (SQLite in the data folder) or one of INDEX_SCHEMES. Only the scheme is
    quoted back: the rest may hold a password."""
    if not url:
        return
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f'{where}: not a database URL (no "://"); give {INDEX_URL_FORMS}, or leave it '
            "empty for SQLite in the data folder"
        )
    if scheme.lower() not in INDEX_SCHEMES:
        raise ConfigError(
            f"{where}: scheme {scheme!r} is not one compacs opens; allowed: "
            f"{', '.join(INDEX_SCHEMES)} (e.g. {INDEX_URL_FORMS})"
        )


def _build_node(raw: dict[str, Any], tables: dict[str, dict[str, Any]], source: str) -> NodeConfig:
    """Validate the merged [node] table; `source` names where each value may have come from."""
    where = f"{source}: [node]"
    on_dup = raw["on_duplicate"]
    if on_dup not in ON_DUPLICATE:
        raise ConfigError(
            f"{where} on_duplicate = {on_dup!r}: allowed values are {', '.join(ON_DUPLICATE)}"
        )
    extra = raw["extra_sop_classes"]
    if not isinstance(extra, list) or not all(isinstance(u, str) for u in extra):
        raise ConfigError(f"{where} extra_sop_classes: must be a list of SOP Class UID strings")
    for uid in extra:
        from compacs.service.validate import is_valid_uid

        if not is_valid_uid(uid):
            raise ConfigError(f"{where} extra_sop_classes: {uid!r} is not a valid UID")
    for key in ("host", "index_url", "data_dir"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{where} {key}: must be a string, got {raw[key]!r}")
    _check_index_url(raw["index_url"], f"{where} index_url")
    return NodeConfig(
        ae_title=check_ae_title(raw["ae_title"], f"{where} ae_title"),
        host=raw["host"],
        port=int_in(raw["port"], f"{where} port", 1, 65535),
        data_dir=Path(raw["data_dir"]),
        index_url=raw["index_url"],
        workers=int_in(raw["workers"], f"{where} workers", 0, 256),
        on_duplicate=on_dup,
        max_pdu=int_in(raw["max_pdu"], f"{where} max_pdu", 0, 2**31 - 1),
        fast_paths=as_bool(raw["fast_paths"], f"{where} fast_paths"),
        extra_sop_classes=list(extra),
        check_called_ae=as_bool(raw["check_called_ae"], f"{where} check_called_ae"),
        shutdown_grace_seconds=number_in(
            raw["shutdown_grace_seconds"], f"{where} shutdown_grace_seconds", 0, 3600
        ),
        processes=int_in(raw["processes"], f"{where} processes", 0, 64),
        ingest=IngestConfig(**tables["ingest"]),
        limits=Limits(**tables["limits"]),
        storage=StorageConfig(**tables["storage"]),
        tiering=TieringConfig(**tables["tiering"]),
        source=source,
    )


def _typed_table(
    table: str, raw: Any, keys: dict[str, tuple[type, float, float]], source: str
) -> dict[str, Any]:
    """A [table] of scalars, each checked against its kind and range; errors name the file,
    the table, the key and what is allowed."""
    known_keys(table, raw, keys, source)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind, lo, hi = keys[key]
        where = f"{source}: [{table}] {key}"
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(
            value, (int, float) if kind is float else int
        ):
            what = "a number" if kind is float else "an integer"
            raise ConfigError(f"{where}: must be {what} from {lo:g} to {hi:g}, got {value!r}")
        elif not lo <= value <= hi:
            raise ConfigError(f"{where}: must be from {lo:g} to {hi:g}, got {value!r}")
        values[key] = kind(value)
    return values


def _parse_host_port(value: Any, where: str) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f'{where}: must be "host:port" with a port 1-65535, got {value!r}')
    return host, int(port)


def _parse_tables(user: dict[str, Any], source: str) -> tuple[dict, Access]:
    """[move_destinations] and [access], validated."""
    moves_raw = user.get("move_destinations", {})
    if not isinstance(moves_raw, dict):
        raise ConfigError(f'{source}: [move_destinations] must be a table of AE = "host:port"')
    moves = {}
    for ae, value in moves_raw.items():
        where = f"{source}: [move_destinations] {ae}"
        moves[check_ae_title(ae, where)] = _parse_host_port(value, where)
    access_raw = user.get("access", {})
    if not isinstance(access_raw, dict):
        raise ConfigError(f"{source}: [access] must be a table")
    rules: dict[str, tuple[tuple[str, str | None], ...]] = {}
    local_callers = as_bool(
        access_raw.get("local_callers", True), f"{source}: [access] local_callers"
    )
    for service, callers in access_raw.items():
        where = f"{source}: [access] {service}"
        if service == "local_callers":
            continue
        if service not in SERVICES:
            raise ConfigError(
                f"{where}: unknown key; allowed keys: {', '.join(SERVICES)}, local_callers"
            )
        if not isinstance(callers, list) or not all(isinstance(c, str) for c in callers):
            raise ConfigError(f'{where}: must be a list like ["MODALITY1", "PACS@10.0.0.5", "*"]')
        entries = []
        for caller in callers:
            ae, _, host = caller.partition("@")
            entries.append((ae if ae == "*" else check_ae_title(ae, where), host or None))
        rules[service] = tuple(entries)
    return moves, Access(rules, local_callers)


def load_config(
    path: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> NodeConfig:
    """The node's configuration: defaults, then `path`, then `env`, then `overrides` (CLI)."""
    defaults = _read_toml(
        resources.files("compacs.service").joinpath("defaults.toml").read_text(), DEFAULTS_NAME
    )
    node = dict(defaults["node"])
    rules_raw, rules_source = defaults["rules"], DEFAULTS_NAME
    source = DEFAULTS_NAME
    user: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
        user = _read_toml(text, source)
        unknown = sorted(set(user) - {*TABLES, "rules", "tiers"})
        if unknown:
            raise ConfigError(
                f"{source}: unknown table(s) {', '.join(unknown)}; allowed: [node], [[rules]], "
                "[[tiers]], " + ", ".join(f"[{t}]" for t in TABLES if t != "node")
            )
        user_node = user.get("node", {})
        known_keys("node", user_node, sorted(node), source)
        node.update(user_node)
        if "rules" in user:
            rules_raw, rules_source = user["rules"], source
    env = os.environ if env is None else env
    used = [var for var in ENV_OVERRIDES if env.get(var)]
    for var in used:
        node[ENV_OVERRIDES[var]] = env[var]
    if used:
        source = f"{source} with {', '.join(used)} from the environment"
    for key, value in (overrides or {}).items():
        if value is not None and key not in ("metrics_port", "web_port"):
            node[key] = value
    tables = {
        name: _typed_table(
            name,
            {**defaults[name], **_typed_table(name, user.get(name, {}), keys, source)},
            keys,
            source,
        )
        for name, keys in (
            ("ingest", _INGEST_KEYS),
            ("limits", _LIMIT_KEYS),
            ("storage", _STORAGE_KEYS),
            ("tiering", _TIERING_KEYS),
        )
    }
    config = _build_node(node, tables, source)
    config.move_destinations, config.access = _parse_tables(user, source)
    config.tls = parse_tls(user.get("tls", {}), defaults["tls"], config.port, source)
    config.metrics = parse_metrics(
        user.get("metrics", {}),
        defaults["metrics"],
        env.get("COMPACS_METRICS_PORT"),
        (overrides or {}).get("metrics_port"),
        str(path) if path is not None else DEFAULTS_NAME,
    )
    dicom_ports = {config.port} if config.tls.plain_port else set()
    if config.tls.enabled:
        dicom_ports.add(config.tls.port)
    if config.metrics.port in dicom_ports:
        raise ConfigError(
            f"{source}: [metrics] port = {config.metrics.port} is also a DICOM port of this "
            "node: give the metrics endpoint a port of its own (9464 is Prometheus' usual "
            "one for exporters)"
        )
    config.logging = parse_logging(user.get("logging", {}), defaults["logging"], source)
    config.web = parse_web(
        user.get("web", {}), defaults["web"], (overrides or {}).get("web_port"), config, source
    )
    try:
        config.rules = parse_rules(rules_raw)
    except ValueError as exc:
        raise ConfigError(f"{rules_source}: {exc}") from exc
    try:
        config.tiers = parse_tiers(user.get("tiers"), config.data_dir)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return config
