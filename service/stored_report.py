"""What the node tells of an object it has stored: metrics, the log line, the audit.

One place for both ways an object gets stored compressed: a compression job's result
recorded in the index (jobs.py), and an object compressed before its ack (ingest.py).
"""

from __future__ import annotations

import logging

from compacs.codecs import registry
from compacs.service import metrics
from compacs.service.compress_worker import Arrival, JobResult
from compacs.service.storage.index import Index

log = logging.getLogger("compacs.jobs")


def report_stored(index: Index, result: JobResult, sop: str, calling_ae: str) -> None:
    """Metrics, log line and audit of a compression result the index has recorded."""
    metrics.count_stored(result.codec, result.modality, result.received_size, result.size)
    for codec, reason in metrics.fallbacks(result.notes, registry.names()):
        metrics.CODEC_FALLBACKS.labels(codec, reason).inc()
    ratio = result.received_size / result.size if result.size else 0.0
    log.info(
        "stored SOP %s from %s: codec %s, %d -> %d bytes, ratio %.2f%s%s",
        sop,
        calling_ae,
        result.codec,
        result.received_size,
        result.size,
        ratio,
        ", before the ack" if isinstance(result.job, Arrival) else "",
        f" ({'; '.join(result.notes)})" if result.notes else "",
        extra={"peer_ae": calling_ae, "sop_instance_uid": sop},
    )
    if result.derived:
        derived = result.derived
        log.warning(
            "SOP %s stored LOSSILY as derived SOP %s (codec %s, max |error| %d, bound %d: "
            "a rule allows it)",
            derived.source_sop_instance_uid,
            derived.sop_instance_uid,
            result.codec,
            derived.max_error,
            derived.bound,
        )
        index.audit(
            "lossy_derived",
            sop_uid=derived.sop_instance_uid,
            calling_ae=calling_ae,
            detail=f"from {derived.source_sop_instance_uid}, {result.codec}, "
            f"max |error| {derived.max_error} <= {derived.bound}",
        )
    if result.fallbacks:
        index.audit(
            "codec_fallback",
            sop_uid=sop,
            calling_ae=calling_ae,
            detail="; ".join(result.notes),
        )


def flagged(index: Index, sop_uid: str, calling_ae: str, defects: str, as_received: bool) -> None:
    """Tell the administrator of an object kept although non-conformant: log and audit."""
    log.warning(
        "non-conformant object from %s kept%s: SOP %s: %s",
        calling_ae,
        " as received, not compressed" if as_received else "",
        sop_uid,
        defects,
    )
    index.audit("nonconformant", sop_uid=sop_uid, calling_ae=calling_ae, detail=defects)
