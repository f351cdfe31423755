"""The C-FIND handler: the query (query.py, through the archive service) answered on the
association, fast (encoded answers sent by find_responses) or pynetdicom's own way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy.exc import SQLAlchemyError

from compacs.service import query
from compacs.service.archive_service import ArchiveService
from compacs.service.dimse import find_responses, identifier_encoding, internals
from compacs.service.dimse.authorisation import (
    NOT_AUTHORISED_COMMENT,
    STATUS_NOT_AUTHORISED,
    failure,
    refused,
)

log = logging.getLogger("compacs.scp")

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
# Only these two: find_responses writes answers in little endian, implicit or explicit VR.
QUERY_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", IMPLICIT_VR_LE]
# C-FIND SOP class -> query information model of service/query.py
FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "patient",
    StudyRootQueryRetrieveInformationModelFind: "study",
}
STATUS_CANCEL = 0xFE00
STATUS_PENDING = 0xFF00


def handle_find(
    event: evt.Event, service: ArchiveService
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: one pending response per match, matched in SQL by query.

    With the fast paths on, the pending responses are encoded straight to bytes from the
    query's rows (identifier_encoding) and sent by find_responses (pynetdicom's per-answer
    encoding cost 1.4 ms each); only the final status is yielded to pynetdicom. Off, they are
    yielded as Datasets (query.find), as pynetdicom's handler protocol has it. C-CANCEL is checked
    before every answer (pynetdicom records it from its receive thread); a bad identifier
    gets 0xA900/0xC000 with an Error Comment, an index failure 0xC000.
    """
    calling = event.assoc.requestor.ae_title
    model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "study")
    if refused(event, service.allows, "query"):
        yield failure(STATUS_NOT_AUTHORISED, NOT_AUTHORISED_COMMENT["query"]), None
        return
    try:
        identifier = event.identifier
    except Exception as exc:  # the identifier's bytes are not a data set
        log.warning("C-FIND from %s refused: identifier cannot be decoded: %s", calling, exc)
        yield failure(query.STATUS_IDENTIFIER_MISMATCH, f"cannot decode identifier: {exc}"), None
        return
    level = query.query_level(identifier)
    fast = internals.fast_paths()
    try:
        if fast:
            implicit_vr = str(event.context.transfer_syntax) == IMPLICIT_VR_LE
            plan, rows = service.find_rows(identifier, model)
            answers = identifier_encoding.encoded_answers(plan, rows, implicit_vr=implicit_vr)
        else:
            answers = service.find(identifier, model)
    except query.QueryError as exc:
        log.warning(
            "C-FIND from %s (%s root) refused: %s (status 0x%04X)",
            calling,
            model,
            exc.reason,
            exc.status,
        )
        yield failure(exc.status, exc.reason), None
        return
    pending = find_responses.PendingResponses(event) if fast else None
    sent = 0
    try:
        for answer in answers:
            if event.is_cancelled:
                if pending is not None:
                    pending.discard()
                log.info(
                    "C-FIND from %s (%s root, %s level) cancelled after %d answer(s)",
                    calling,
                    model,
                    level,
                    sent,
                )
                yield STATUS_CANCEL, None
                return
            if pending is not None:
                pending.send(answer)
            else:
                yield STATUS_PENDING, answer
            sent += 1
        if pending is not None:
            pending.flush()
    except SQLAlchemyError as exc:
        log.error("C-FIND from %s failed after %d answer(s): index error: %s", calling, sent, exc)
        if pending is not None:
            with contextlib.suppress(find_responses.AssociationGone):
                pending.flush()  # the answers found before the failure
        yield failure(query.STATUS_UNABLE_TO_PROCESS, "index error"), None
        return
    except find_responses.AssociationGone:
        log.warning("C-FIND from %s: association ended after %d answer(s)", calling, sent)
        return
    log.info("C-FIND from %s (%s root, %s level): %d match(es)", calling, model, level, sent)
