"""C-GET and C-MOVE sub-operations: C-STOREs of the retrieved instances, each in a syntax
the peer accepted (retrieve.prepare makes it), on the requestor's association (C-GET) or on
a new one to the move destination (C-MOVE).

Instances are read, prepared and handed to pynetdicom one at a time, with the next one
read and decoded in a helper thread while the current one is sent, so memory does not grow
with the size of the study. With the fast paths on (dimse/internals.py) the C-STOREs go out
framed by bulk_store and the association polls its socket often; off, pynetdicom sends
plain Datasets its own way.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context

from compacs.service import retrieve
from compacs.service.dimse import bulk_store, internals
from compacs.service.dimse.bulk_store import bulk_stores
from compacs.service.dimse.polling import fast_polling, poll_fast
from compacs.service.retrieve import candidate_syntaxes
from compacs.service.storage.index import Instance
from compacs.service.syntaxes import EXPLICIT_LE
from compacs.service.wire import WireInstance

log = logging.getLogger("compacs.retrieve")

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
# Instances read and decoded ahead of the one being sent (memory holds READ_AHEAD + 1).
READ_AHEAD = 1
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


def failed_suboperation(inst: Instance) -> Dataset:
    """A dataset pynetdicom cannot send (no context has this syntax): it counts the
    sub-operation as failed and lists the SOP Instance UID, as PS3.4 C.4.2.3.1 asks."""
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_instance_uid
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.999")  # no peer accepts it
    return ds


def accepted_for(contexts: list[PresentationContext], sop_class: str, role: str) -> list[str]:
    """Accepted syntaxes for `sop_class` in which we may send (role 'scu'), peer's order first."""
    found = []
    for cx in sorted(contexts, key=lambda c: c.context_id or 0):
        if cx.abstract_syntax == sop_class and getattr(cx, f"as_{role}"):
            found.extend(str(ts) for ts in cx.transfer_syntax)
    return found


@dataclass
class SubAssociation:
    """Filled by the sub-association's EVT_ACCEPTED, so the C-MOVE generator can see which
    syntaxes the move destination accepted."""

    assoc: Any = None
    contexts: list[PresentationContext] = field(default_factory=list)

    def on_accepted(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        if internals.fast_paths():
            poll_fast(event.assoc)  # lives only for this C-MOVE
            bulk_store.enable(event.assoc)
        self.contexts = list(event.assoc.accepted_contexts)


def move_contexts(instances: list[Instance]) -> list[PresentationContext]:
    """One context per (SOP class, syntax): peers such as Orthanc pick uncompressed when one
    context offers several syntaxes. Trimmed to 128 by dropping the least wanted first."""
    wanted: list[tuple[str, str]] = []
    for inst in instances:
        for ts in candidate_syntaxes(inst):
            if (inst.sop_class_uid, ts) not in wanted:
                wanted.append((inst.sop_class_uid, ts))
    if len(wanted) > MAX_CONTEXTS:  # keep as-stored and explicit VR LE for every class
        essential = [w for w in wanted if w[1] == EXPLICIT_LE] + [
            w for w in wanted if w[1] != EXPLICIT_LE
        ]
        wanted = essential[:MAX_CONTEXTS]
    return [build_context(sop, ts) for sop, ts in wanted]


def suboperations(
    read: Callable[[Instance], bytes],
    instances: list[Instance],
    event: evt.Event,
    accepted: Callable[[str], list[str]],
    accessed: Callable[[list[int]], None] = lambda ids: None,
    open_blob: retrieve.OpenBlob | None = None,
) -> Iterator[tuple[int, Dataset | None]]:
    """The (status, dataset) pairs of a C-GET/C-MOVE; `read` and `open_blob` are the archive
    service's, and `accessed` is told which instances were read (tier policies count from
    last access).

    The next instance is read and decoded in a helper thread while pynetdicom sends the
    current one (CharLS via imagecodecs releases the GIL), so at most two are in memory;
    a big one is only opened ahead, and read and decoded frame by frame as it is sent.
    """
    calling = event.assoc.requestor.ae_title
    fast = internals.fast_paths()

    def load(inst: Instance) -> Dataset:
        try:
            return retrieve.prepare(read, inst, accepted(inst.sop_class_uid), fast, open_blob)
        except Exception as exc:  # damaged blob, no common syntax, decode failure
            log.error("retrieve of SOP %s for %s failed: %s", inst.sop_instance_uid, calling, exc)
            return failed_suboperation(inst)

    with (
        fast_polling(event.assoc) if fast else contextlib.nullcontext(),
        bulk_stores(event.assoc) if fast else contextlib.nullcontext(),
        ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="retrieve") as loader,
    ):
        upcoming = deque(loader.submit(load, inst) for inst in instances[:READ_AHEAD])
        for i in range(len(instances)):
            ds = upcoming.popleft().result()
            if i + READ_AHEAD < len(instances):
                upcoming.append(loader.submit(load, instances[i + READ_AHEAD]))
            if event.is_cancelled:
                log.info("retrieve cancelled by %s", calling)
                _close(ds, *(f.result() for f in upcoming))
                accessed([inst.id for inst in instances[:i]])
                yield STATUS_CANCEL, None
                return
            try:
                yield STATUS_PENDING, ds
            finally:
                _close(ds)
        accessed([inst.id for inst in instances])


def _close(*prepared: Dataset) -> None:
    """Let go of the blob files that streamed instances were sent from (or were not)."""
    for ds in prepared:
        if isinstance(ds, WireInstance):
            ds.close()
