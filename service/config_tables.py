"""The node's configuration as typed tables: what `config.load_config` returns.

One frozen dataclass per TOML table ([ingest], [limits], [storage], [tiering], [tls],
[metrics], [logging], [access]) and `NodeConfig` holding them with the [node] keys. Every
module that reads the configuration imports these; only config.py reads TOML and checks
values, so that a worker process or a DIMSE handler needs no parser to know its settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from compacs.service.rules import Rule
from compacs.service.tiering.policy import Tier

DEFAULTS_NAME = "<embedded defaults>"
SERVICES = ("store", "query", "retrieve")


@dataclass(frozen=True)
class IngestConfig:
    """[ingest]: the acceptance policy (docs/conformance.md) and compression retries."""

    strict: bool  # refuse non-conformant objects instead of keeping them flagged
    accept_any_sop_class: bool  # accept storage of SOP classes we do not know
    max_attempts: int  # failed compression attempts before an object is parked
    retry_seconds: float
    lease_seconds: float  # how long a claim on a pending object holds without renewal
    # Compress before the ack when at least this many senders are active and a worker is
    # free (ingest.py); 0: never.
    compress_before_ack_from: int


@dataclass(frozen=True)
class Limits:
    """[limits]: what one peer may hold of the node, so that no peer can lock it."""

    association_request_timeout: float  # connect to complete A-ASSOCIATE-RQ
    idle_timeout: float  # no PDU at all on an association
    pdu_read_timeout: float  # first to last byte of one PDU
    max_dataset_bytes: int  # one data set (C-STORE, identifier) at most
    spool_dataset_bytes: int  # larger received data sets go to a file
    max_associations: int
    max_associations_per_ae: int  # by calling AE title
    max_associations_per_address: int  # by peer IP address
    max_pending_per_address: int  # connections not yet associated, by IP address


@dataclass(frozen=True)
class TieringConfig:
    """[tiering]: when the tier and fixity jobs run, and how much of the CPU they may take."""

    every_minutes: float  # the tier run's period inside `compacs serve`; 0: never scheduled
    cpu_share: float  # of one core, so that ingest keeps priority
    stable_minutes: float  # a series with no new instance for this long may be packed
    fixity_every_hours: float  # 0: never scheduled
    fixity_max_age_days: float  # blobs checked longer ago than this are due again


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: how the archive keeps its blobs."""

    delete_grace_seconds: float  # a replaced blob is deleted this long after, not before


# Services a caller not listed in [access] may use: an archive never refuses what it can
# store safely. C-ECHO is always answered and is not a service here.
OPEN_BY_DEFAULT = ("store",)


@dataclass(frozen=True)
class Access:
    """Which callers may use which service: {service: [(AE title, host or None), ...]}.

    Closed by default, as Orthanc is: `query` (C-FIND) and `retrieve` (C-GET, C-MOVE) are
    answered only for the callers listed, `store` for every caller unless it is listed. A
    caller on the node's own host (`local`, decided by the network face) may use every
    service while `local_callers` is true, so that a first local try works without a config.
    """

    rules: dict[str, tuple[tuple[str, str | None], ...]]
    local_callers: bool = True

    def allows(self, service: str, ae_title: str, host: str, local: bool) -> bool:
        if local and self.local_callers:
            return True
        if service not in self.rules:
            return service in OPEN_BY_DEFAULT
        return any(
            (ae == "*" or ae == ae_title.strip()) and (h is None or h == host)
            for ae, h in self.rules[service]
        )

    def allows_any(self, ae_title: str, host: str, local: bool) -> bool:
        return any(self.allows(service, ae_title, host, local) for service in SERVICES)

    def describe(self) -> str:
        parts = []
        for service in SERVICES:
            if service not in self.rules:
                who = "any caller" if service in OPEN_BY_DEFAULT else "nobody listed"
            else:
                listed = [ae if h is None else f"{ae}@{h}" for ae, h in self.rules[service]]
                who = ", ".join(listed) or "nobody listed"
            parts.append(f"{service}: {who}")
        local = "every service" if self.local_callers else "only what is listed"
        return "; ".join(parts) + f"; callers on this host: {local}"


class ConfigError(ValueError):
    """A configuration mistake, worded for the administrator who made it."""


@dataclass(frozen=True)
class TlsConfig:
    """[tls]: DICOM TLS on a port of its own (docs/security.md), beside the plain [node]
    port or instead of it. Files are checked when the config is loaded (config._parse_tls)."""

    port: int = 0  # 0: no TLS port
    certificate: Path | None = None
    key: Path | None = None
    ca_bundle: Path | None = None
    require_client_certificate: bool = True
    plain_port: bool = True  # false: only the TLS port listens

    @property
    def enabled(self) -> bool:
        return self.port != 0

    def describe(self, node_port: int) -> str:
        if not self.enabled:
            return "off"
        clients = (
            "client certificate required"
            if self.require_client_certificate
            else "client certificate optional"
        )
        plain = f"plain port {node_port} open" if self.plain_port else "plain port closed"
        return f"port {self.port}, {clients}, {plain}"


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint (service/metrics.py). Loopback unless configured:
    the counters name no patient, but they tell who sends how much, and when."""

    port: int = 0  # 0: no endpoint
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LoggingConfig:
    """[logging]: plain text lines (the default) or one JSON object per line (logs.py)."""

    format: str = "text"
    level: str = "INFO"


MAX_AUTO_PROCESSES = 4


@dataclass
class NodeConfig:
    ae_title: str
    host: str
    port: int
    data_dir: Path
    index_url: str
    workers: int
    on_duplicate: str
    max_pdu: int
    fast_paths: bool
    extra_sop_classes: list[str]
    check_called_ae: bool  # refuse associations addressed to another AE title
    shutdown_grace_seconds: float  # after SIGTERM, before open associations are aborted
    processes: int  # node processes serving the port (serve --processes); 0: per core, <= 4
    ingest: IngestConfig
    limits: Limits
    storage: StorageConfig
    tiering: TieringConfig
    rules: list[Rule] = field(default_factory=list)
    tiers: list[Tier] = field(default_factory=list)
    move_destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    access: Access = field(default_factory=lambda: Access({}))
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    web: WebConfig = field(default_factory=lambda: WebConfig())
    source: str = DEFAULTS_NAME
    # Which of the node's processes this is (processes.py sets it in each): 0 for the first
    # or only one, which alone runs the metrics and web ports and the tier scheduler.
    process: int = 0

    @property
    def effective_index_url(self) -> str:
        if self.index_url:
            return self.index_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def effective_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def effective_processes(self) -> int:
        """`processes = 0`: one per core, at most MAX_AUTO_PROCESSES (past that the index's
        writes, not the GIL, are what one more process would wait on)."""
        return self.processes or min(os.cpu_count() or 1, MAX_AUTO_PROCESSES)


@dataclass(frozen=True)
class WebConfig:
    """[web]: the DICOMweb face and status page (service/web). Who may use it is [access]'s
    to say, with `users` naming HTTP callers as AE titles name DICOM ones."""

    port: int = 0  # 0: no web face
    host: str = "127.0.0.1"
    tls: bool = False  # with [tls] certificate and key
    cors_origins: tuple[str, ...] = ()
    viewer: Path | None = None  # an unpacked OHIF dist/ served at /
    # name -> "sha256:HEX" of the password (HTTP Basic) or token (Bearer)
    users: dict[str, str] = field(default_factory=dict)
