"""The DICOM service class provider: which contexts we accept and the DIMSE event handlers.

Handlers follow pynetdicom's event-handler API: each takes the event, hands the work to the
module that owns it (ingest for C-STORE) and returns a status, nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from compacs.service.config import NodeConfig
from compacs.service.ingest import Ingest
from compacs.service.validate import STATUS_CANNOT_UNDERSTAND
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification

log = logging.getLogger("compacs.scp")

# What the issue and docs/conformance.md promise, in order of our preference.
STORAGE_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
]


def storage_sop_classes(config: NodeConfig) -> list[str]:
    return sorted(set(_STORAGE_CLASSES.values()) | set(config.extra_sop_classes))


def handle_store(event: evt.Event, ingest: Ingest) -> int:
    calling = event.assoc.requestor.ae_title
    request = event.request
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
        raw = event.encoded_dataset()
    except Exception as exc:  # pydicom could not decode what the peer sent
        log.warning(
            "refused from %s: dataset cannot be decoded: %s (status 0x%04X)",
            calling,
            exc,
            STATUS_CANNOT_UNDERSTAND,
        )
        return STATUS_CANNOT_UNDERSTAND
    return ingest.receive(
        raw, ds, calling, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
    )


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def _log_association(kind: str) -> Callable[[evt.Event], None]:
    def handler(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.info(
            "association %s: %s from %s:%s",
            kind,
            requestor.ae_title,
            requestor.address,
            requestor.port,
        )

    return handler


def build_ae(config: NodeConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.max_pdu
    ae.maximum_associations = 64
    ae.network_timeout = 60
    ae.dimse_timeout = 60
    ae.acse_timeout = 30
    ae.add_supported_context(Verification)
    syntaxes = [UID(ts) for ts in STORAGE_TRANSFER_SYNTAXES]
    for uid in storage_sop_classes(config):
        ae.add_supported_context(uid, syntaxes)
    return ae


def handlers(ingest: Ingest) -> list:
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingest]),
        (evt.EVT_ACCEPTED, _log_association("accepted")),
        (evt.EVT_RELEASED, _log_association("released")),
        (evt.EVT_ABORTED, _log_association("aborted")),
        (evt.EVT_REJECTED, _log_association("rejected")),
    ]
