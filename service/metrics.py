"""Prometheus metrics of `compacs serve`, at /metrics on `[metrics] host:port`.

Design: everything is counted in the node process, never in a worker. A compression worker
returns its result (codec, sizes, modality, fallbacks) to the node, which counts it when it
records the result (jobs.py); a tier move's and a fixity run's reports are counted the same
way. So prometheus_client's plain in-process registry is exact, and its multiprocess mode
(files in PROMETHEUS_MULTIPROC_DIR, summed at scrape, no gauges of the node's own) is not
needed. Several `compacs serve` processes on one host each serve their own /metrics on a
port of their own (`[metrics] port`): Prometheus scrapes each as a target and sums them.

The gauges read from the index (pending and parked instances) are counted in SQL at scrape
time through the index on `instance.state` (only the rows in those states are touched, not
the table), and cached for CACHE_SECONDS, so that several scrapers or a dashboard reload
cost one query. They describe the index, which nodes may share: sum them per index, not per
node (the dashboard takes max). The tier backlog is what the last tier run found due and did
not move: counting what is due means judging every stored instance against the tier
policies, a full scan that belongs to the run, not to a scrape.

No label carries a patient's data or a UID: labels are codec names, modalities (a DICOM CS
value, checked), tier names, association results and fallback reasons.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("compacs.metrics")
disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

CACHE_SECONDS = 5.0
# Seconds: a C-STORE of a small slice takes milliseconds, a big multi-frame object or a
# C-MOVE of a study tens of seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_INDEX_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

ASSOCIATIONS = Counter(
    "compacs_associations",
    "Associations requested of this node, by result: accepted, rejected (by compacs' "
    "[access] and [limits], or by pynetdicom), aborted (after acceptance).",
    ["result"],
)
INSTANCES_RECEIVED = Counter(
    "compacs_instances_received",
    "C-STORE requests received (re-sends and refused ones included).",
)
BYTES_RECEIVED = Counter(
    "compacs_bytes_received",
    "Bytes of the data sets received by C-STORE, as received (Part-10 file size).",
)
INSTANCES_STORED = Counter(
    "compacs_instances_stored",
    "Instances that reached their stored form, by the codec that stored them (passthrough: "
    "kept as received) and modality.",
    ["codec", "modality"],
)
BYTES_STORED = Counter(
    "compacs_bytes_stored",
    "Bytes of the stored form of the instances counted by compacs_instances_stored_total.",
    ["codec", "modality"],
)
BYTES_STORED_FROM = Counter(
    "compacs_bytes_stored_source",
    "Bytes as received of the instances counted by compacs_instances_stored_total: the "
    "numerator of the stored ratio by codec and modality.",
    ["codec", "modality"],
)
CODEC_FALLBACKS = Counter(
    "compacs_codec_fallbacks",
    "A rule's codec not used for an object, by codec and reason: error (the encoder "
    "failed), mismatch (not bit-exact on decoding), unsupported (pixel format), "
    "unavailable (library missing), no_gain (not smaller).",
    ["codec", "reason"],
)
CSTORE_SECONDS = Histogram(
    "compacs_cstore_seconds",
    "Time from a C-STORE request's data set received to its response status.",
    buckets=_LATENCY_BUCKETS,
)
RETRIEVE_SECONDS = Histogram(
    "compacs_retrieve_seconds",
    "Time of a C-GET or C-MOVE, from the request to the last sub-operation.",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
INDEX_SECONDS = Histogram(
    "compacs_index_seconds",
    "Time of one index write transaction (waiting for the process' write lock included).",
    buckets=_INDEX_BUCKETS,
)
FIXITY_FAILURES = Counter(
    "compacs_fixity_failures",
    "Blobs found damaged by this process' fixity runs (checksum or decoding).",
)
VOLUME_FRAMES_DECODED = Counter(
    "compacs_volume_frames_decoded",
    "Frames decoded out of series volumes to read slices from them: a slice decodes only "
    "the group of frames that holds it, and groups decoded lately are kept, so this grows "
    "by at most gop_size per slice read, not by the series' length.",
)
TIER_BACKLOG = Gauge(
    "compacs_tier_backlog_instances",
    "Instances the last tier run of this process found due for the tier and did not move.",
    ["tier"],
)

# Known label values start at 0, so that a rate() sees their first increase.
for _result in ("accepted", "rejected", "aborted"):
    ASSOCIATIONS.labels(_result)
for _operation in ("get", "move"):
    RETRIEVE_SECONDS.labels(_operation)

# A CS value (PS3.5 6.2): what a modality label may be; anything else is counted as "other".
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
_FALLBACK_NOTE = re.compile(r"(?P<codec>[\w-]+)(?P<failed> failed)?: (?P<text>.*)", re.DOTALL)


def modality_label(value: Any) -> str:
    """The Modality as a label: "unknown" when absent, "other" when not a CS value (a
    label's values are a time series each: a hostile sender must not create thousands)."""
    text = str(value or "").strip()
    if not text:
        return "unknown"
    return text if _CS.fullmatch(text) else "other"


def fallbacks(notes: Iterable[str], codec_names: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(codec, reason) for each of a rule's codecs that a compression result's notes
    (compress.Outcome.notes) say was passed over; notes about the object itself (pixel data
    that does not decode, a syntax it arrived in) are not fallbacks."""
    names = set(codec_names)
    for note in notes:
        match = _FALLBACK_NOTE.fullmatch(note)
        if match is None or match["codec"] not in names:
            continue
        text = match["text"]
        if match["failed"]:
            reason = "mismatch" if "bit-exact" in text else "error"
        elif text.startswith("arrived in that syntax"):
            continue
        elif text == "not available":
            reason = "unavailable"
        elif text.startswith("no gain"):
            reason = "no_gain"
        else:
            reason = "unsupported"
        yield match["codec"], reason


def count_stored(codec: str, modality: str, received: int, stored: int) -> None:
    """One instance in its stored form (node process: jobs.py, ingest.py)."""
    INSTANCES_STORED.labels(codec, modality).inc()
    BYTES_STORED.labels(codec, modality).inc(stored)
    BYTES_STORED_FROM.labels(codec, modality).inc(received)


class IndexGauges(Collector):
    """compacs_pending_instances and compacs_parked_instances, counted in the index at
    scrape time and cached for CACHE_SECONDS (see the module's docstring)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._at = -CACHE_SECONDS
        self._counts: dict[str, int] | None = None

    def _read(self) -> dict[str, int] | None:
        with self._lock:
            if time.monotonic() - self._at >= CACHE_SECONDS:
                try:
                    self._counts = self.index.state_counts()
                except Exception as exc:  # the index down: no gauge rather than a wrong one
                    log.warning("metrics: the index cannot be read for the gauges: %s", exc)
                    self._counts = None
                self._at = time.monotonic()
            return self._counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._read()
        for state, help_text in (
            ("pending", "Instances acknowledged and waiting for compression, in the index."),
            ("parked", "Instances whose compression failed [ingest] max_attempts times, kept "
             "as received, in the index."),
        ):  # fmt: skip
            family = GaugeMetricFamily(f"compacs_{state}_instances", help_text)
            if counts is not None:
                family.add_metric([], counts.get(state, 0))
            yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # without this, registering would call collect() and query the index at start
        for name in ("compacs_pending_instances", "compacs_parked_instances"):
            yield GaugeMetricFamily(name, "")


class MetricsServer:
    """The /metrics endpoint of one node, with its index gauges."""

    def __init__(self, host: str, port: int, index: Any) -> None:
        self.gauges = IndexGauges(index)
        REGISTRY.register(self.gauges)
        try:
            self.server, self.thread = start_http_server(port, addr=host)
        except BaseException:
            REGISTRY.unregister(self.gauges)
            raise

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        REGISTRY.unregister(self.gauges)
