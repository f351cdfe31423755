"""The DICOM service class provider: the AE, which contexts it accepts, which handler
answers each event, and the C-STORE and C-ECHO handlers.

Handlers follow pynetdicom's event-handler API: each takes the event, hands the work to the
archive service (archive_service.py) or to the module that owns it, and returns a status,
nothing more. The others live by job: association_events.py (admission, start, end),
authorisation.py ([access]), find_handler.py (C-FIND, which hands its pending answers, as
bytes, to find_responses and yields only the final status), retrieve_handlers.py (C-GET,
C-MOVE).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from compacs.service import logs, metrics, syntaxes
from compacs.service.archive_service import ArchiveService
from compacs.service.config import NodeConfig
from compacs.service.dimse import admission, identity, internals, suboperations
from compacs.service.dimse.admission import Admission
from compacs.service.dimse.association_events import (
    association_ended,
    handle_accepted,
    handle_conn_open,
    handle_requested,
)
from compacs.service.dimse.authorisation import STATUS_NOT_AUTHORISED, refused
from compacs.service.dimse.find_handler import FIND_MODELS, QUERY_TRANSFER_SYNTAXES, handle_find
from compacs.service.dimse.retrieve_handlers import RETRIEVE_MODELS, handle_get, handle_move
from compacs.service.dimse.slots import SharedSlots
from compacs.service.sop_classes import storage_sop_classes

log = logging.getLogger("compacs.scp")

PYNETDICOM_THREAD_CEILING = 4096


def handle_store(event: evt.Event, service: ArchiveService) -> int:
    """EVT_C_STORE: the object to the archive service; counted and timed (metrics.py), and
    every line logged meanwhile names the SOP Instance (logs.py)."""
    started = time.perf_counter()
    request = event.request
    sop = str(request.AffectedSOPInstanceUID)
    with logs.instance(sop):
        if refused(event, service.allows, "store"):
            return STATUS_NOT_AUTHORISED
        requestor = event.assoc.requestor
        args = (requestor.ae_title, str(request.AffectedSOPClassUID), sop)
        spooled = getattr(request, "_dataset_path", None)  # receive_limits: a big data set
        if spooled is None:
            raw: bytes | Path = event.encoded_dataset()
            size = len(raw)
        else:
            raw = Path(spooled)  # parsed and archived from its file
            size = raw.stat().st_size
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(size)
        status = service.receive(raw, *args)
        metrics.CSTORE_SECONDS.observe(time.perf_counter() - started)
        if status == 0x0000:  # a refusal or failure has its own line (ingest.py)
            log.info(
                "received SOP %s from %s at %s: %d bytes",
                sop,
                requestor.ae_title,
                requestor.address,
                size,
                extra=logs.peer_extra(requestor.ae_title, requestor.address, sop),
            )
        return status


def handle_echo(event: evt.Event) -> int:
    return 0x0000


class _CheapCopyContext(PresentationContext):
    """A supported context that copies cheaply.

    pynetdicom deep-copies the server's supported contexts for every new association: 29 ms
    of CPU for our ~177 storage classes x 16 syntaxes, on every C-STORE, C-FIND and C-GET
    association (a one-answer findscu took 103 ms against 16 ms on an open association).
    Its attributes are immutable strings, flags and one list of syntaxes, so copying the
    attribute dict and that list is a faithful deep copy.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> _CheapCopyContext:
        copy = cls.__new__(cls)
        copy.__dict__.update(context.__dict__)
        copy._transfer_syntax = list(context._transfer_syntax)
        return copy

    def __deepcopy__(self, memo: dict) -> _CheapCopyContext:
        return self.of(self)


def server_contexts(ae: AE) -> list[PresentationContext]:
    """The AE's supported contexts, as cheaply copyable ones for `start_server` (with the
    fast paths on: the copy relies on PresentationContext's attributes in 3.0.4)."""
    if not internals.fast_paths():
        return ae.supported_contexts
    return [_CheapCopyContext.of(cx) for cx in ae.supported_contexts]


def build_ae(config: NodeConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    identity.apply(ae)  # on the associations it accepts, and on C-MOVE sub-associations
    ae.maximum_pdu_size = config.max_pdu
    # admission.py counts and limits associations; pynetdicom's own count would include
    # connections that never asked for one
    ae.maximum_associations = PYNETDICOM_THREAD_CEILING
    ae.network_timeout = config.limits.idle_timeout
    ae.connection_timeout = suboperations.CONNECT_TIMEOUT  # C-MOVE sub-associations
    ae.dimse_timeout = 60
    ae.acse_timeout = admission.ESTABLISHED_ACSE_TIMEOUT
    ae.add_supported_context(Verification)
    storage = [UID(ts) for ts in syntaxes.STORAGE_ACCEPTED]  # in syntaxes.py's order
    for uid in storage_sop_classes(config):
        # both roles: peers store to us, and take the SCP role for C-GET sub-operations
        ae.add_supported_context(uid, storage, scu_role=True, scp_role=True)
    for uid in [*FIND_MODELS, *RETRIEVE_MODELS]:
        ae.add_supported_context(uid, QUERY_TRANSFER_SYNTAXES)
    return ae


def handlers(service: ArchiveService, shared: SharedSlots | None = None) -> list:
    """`shared`: the slots this process counts with its siblings (serve --processes N)."""
    config = service.config
    gate = Admission(config.limits, shared)  # one per process: it counts all its associations
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [service]),
        (evt.EVT_C_FIND, handle_find, [service]),
        (evt.EVT_C_GET, handle_get, [service]),
        (evt.EVT_C_MOVE, handle_move, [service]),
        (evt.EVT_CONN_OPEN, handle_conn_open, [config, gate]),
        (evt.EVT_REQUESTED, handle_requested, [config, gate]),
        (evt.EVT_ACCEPTED, handle_accepted, [service.allows, gate]),
        (evt.EVT_RELEASED, association_ended("released", gate)),
        (evt.EVT_ABORTED, association_ended("aborted", gate)),
        (evt.EVT_REJECTED, association_ended("rejected", gate)),
        (evt.EVT_CONN_CLOSE, association_ended(None, gate)),
    ]
