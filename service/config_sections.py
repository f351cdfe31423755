"""The tables of the node's faces: [tls], [metrics], [logging] and [web], each parsed and
validated apart from the core node settings (config.py), so that a new face adds its table here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from compacs.service.config_checks import as_bool, check_ae_title, int_in, known_keys
from compacs.service.config_tables import (
    ConfigError,
    LoggingConfig,
    MetricsConfig,
    NodeConfig,
    TlsConfig,
    WebConfig,
)

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


_TLS_FILES = ("certificate", "key", "ca_bundle")
_TLS_KEYS = ("port", *_TLS_FILES, "require_client_certificate", "plain_port")


def parse_tls(raw: Any, defaults: dict[str, Any], node_port: int, source: str) -> TlsConfig:
    """[tls], validated: the port, and the certificate, key and CA bundle loaded as the node
    will load them, so that a file it cannot use stops it before it listens."""
    known_keys("tls", raw, _TLS_KEYS, source)
    values = {**defaults, **raw}
    where = f"{source}: [tls]"
    port = int_in(values["port"], f"{where} port", 0, 65535)
    require = as_bool(values["require_client_certificate"], f"{where} require_client_certificate")
    plain = as_bool(values["plain_port"], f"{where} plain_port")
    files: dict[str, Path | None] = {}
    for key in _TLS_FILES:
        value = values[key]
        if not isinstance(value, str):
            raise ConfigError(f"{where} {key}: must be a file path (a string), got {value!r}")
        files[key] = Path(value) if value else None
    config = TlsConfig(port, files["certificate"], files["key"], files["ca_bundle"], require, plain)
    if not port:
        if not plain:
            raise ConfigError(
                f"{where} plain_port = false needs a TLS port: set [tls] port (e.g. 2762), "
                "or plain_port = true"
            )
        return config
    if port == node_port and plain:
        raise ConfigError(
            f"{where} port = {port} is also [node] port: give TLS a port of its own, or set "
            "[tls] plain_port = false to listen with TLS only"
        )
    for key in ("certificate", "key"):
        if files[key] is None:
            raise ConfigError(
                f"{where} {key}: required when [tls] port is set (a PEM file: the node's "
                f"{'certificate' if key == 'certificate' else 'unencrypted private key'})"
            )
    if require and files["ca_bundle"] is None:
        raise ConfigError(
            f"{where} ca_bundle: required when require_client_certificate = true (a PEM file "
            "of the CAs that client certificates must chain to); or set "
            "require_client_certificate = false"
        )
    from compacs.service.dimse.tls import TlsSetupError, server_context

    try:
        server_context(
            config.certificate, config.key, config.ca_bundle, config.require_client_certificate
        )
    except TlsSetupError as exc:
        raise ConfigError(f"{where} {exc.key}: {exc}") from exc
    return config


def parse_metrics(
    raw: Any, defaults: dict[str, Any], env_port: str | None, cli_port: int | None, source: str
) -> MetricsConfig:
    """[metrics], then COMPACS_METRICS_PORT, then --metrics-port."""
    known_keys("metrics", raw, defaults, source)
    values = {**defaults, **raw}
    where = f"{source}: [metrics]"
    if env_port:
        values["port"], where = env_port, f"{where} (COMPACS_METRICS_PORT from the environment)"
    if cli_port is not None:
        values["port"], where = cli_port, "--metrics-port"
    port = int_in(values["port"], f"{where} port", 0, 65535)
    host = values["host"]
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(
            f'{source}: [metrics] host: must be an address to listen on, such as "127.0.0.1" '
            f'(this host only, the default) or "0.0.0.0" (every interface), got {host!r}'
        )
    return MetricsConfig(port, host.strip())


def parse_logging(raw: Any, defaults: dict[str, Any], source: str) -> LoggingConfig:
    known_keys("logging", raw, defaults, source)
    values = {**defaults, **raw}
    if values["format"] not in LOG_FORMATS:
        raise ConfigError(
            f"{source}: [logging] format = {values['format']!r}: allowed values are "
            + ", ".join(f'"{f}"' for f in LOG_FORMATS)
        )
    level = values["level"]
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"{source}: [logging] level = {level!r}: allowed values are "
            + ", ".join(f'"{v}"' for v in LOG_LEVELS)
        )
    return LoggingConfig(values["format"], level.upper())


def parse_web(
    raw: Any, defaults: dict[str, Any], cli_port: int | None, config: NodeConfig, source: str
) -> WebConfig:
    """[web], then --web-port; the names in `users` are checked as AE titles because
    [access] lists them beside the AE titles."""
    known_keys("web", raw, defaults, source)
    values = {**defaults, **raw}
    where = f"{source}: [web]"
    port_where = "--web-port" if cli_port is not None else f"{where} port"
    port = int_in(values["port"] if cli_port is None else cli_port, port_where, 0, 65535)
    host = values["host"]
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(
            f'{where} host: must be an address to listen on, such as "127.0.0.1" (this host '
            f'only, the default) or "0.0.0.0" (every interface), got {host!r}'
        )
    tls = as_bool(values["tls"], f"{where} tls")
    if tls and port and (config.tls.certificate is None or config.tls.key is None):
        raise ConfigError(
            f"{where} tls = true: set [tls] certificate and key (PEM files; the web face "
            "uses the DICOM TLS certificate), or tls = false"
        )
    origins = values["cors_origins"]
    if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins):
        raise ConfigError(
            f'{where} cors_origins: must be a list of origins like ["https://viewer.example"] '
            'or ["*"], got ' + repr(origins)
        )
    viewer = values["viewer"]
    if not isinstance(viewer, str):
        raise ConfigError(f"{where} viewer: must be a folder path (a string), got {viewer!r}")
    if viewer and not (Path(viewer) / "index.html").is_file():
        raise ConfigError(
            f"{where} viewer = {viewer!r}: no index.html there; give the dist/ folder of an "
            'unpacked @ohif/app package, or "" for none'
        )
    users = values["users"]
    if not isinstance(users, dict):
        raise ConfigError(f'{where} users: must be a table of NAME = "sha256:HEX"')
    checked: dict[str, str] = {}
    for name, secret in users.items():
        key = f"{where} users.{name}"
        if not isinstance(secret, str) or not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", secret):
            raise ConfigError(
                f'{key}: must be "sha256:" and the 64 hex digits of the SHA-256 of the '
                "password or token (e.g. printf %s SECRET | sha256sum), got a "
                f"{type(secret).__name__}"
            )
        checked[check_ae_title(name, key)] = secret.lower()
    dicom_ports = {config.port, config.tls.port, config.metrics.port} - {0}
    if port and port in dicom_ports:
        raise ConfigError(
            f"{port_where} = {port} is already a DICOM or metrics port of this node: give the "
            "web face a port of its own (8042 is Orthanc's usual one)"
        )
    return WebConfig(
        port, host.strip(), tls, tuple(origins), Path(viewer) if viewer else None, checked
    )
