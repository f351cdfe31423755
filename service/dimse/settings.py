"""The process-wide pydicom and pynetdicom settings of the node, set once at start.

They live in module globals of the two libraries, so they are set in one place: `apply`,
which the node (node.py) calls before it listens; never per association.
"""

from __future__ import annotations

from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config

from compacs.service.config import NodeConfig
from compacs.service.dimse import internals
from compacs.service.sop_classes import storage_sop_classes


def apply(config: NodeConfig) -> None:
    # pynetdicom's default event handlers format every PDU and DIMSE message for its debug
    # log, which the node's logging set-up silences anyway: 7 ms of CPU for each association
    # a getscu opens (py-spy).
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # pydicom checks every value it reads against its VR and only warns (WARN mode): 3 ms per
    # getscu association in UID regexes alone. validate.py checks what the node relies on.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    # A value whose length does not fit its VR (a US one byte long) raises when it is first
    # read, which may be long after ingest checked the data set (the index reading Columns:
    # 0x0110 and a traceback). As UN it reads as the bytes received, and what the node
    # relies on is checked by validate.py as for any other bad value.
    pydicom_config.convert_wrong_length_to_UN = True
    # [ingest] accept_any_sop_class: pynetdicom then accepts a proposed abstract syntax it
    # was not configured with as a storage SOP class (private classes).
    pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE = config.ingest.accept_any_sop_class
    # The node judges calling AE titles itself (admission.ae_title_problem), so that a title
    # the AE VR forbids (a tab, a backslash) gets A-ASSOCIATE-RJ "calling AE title not
    # recognised" with a log line; pynetdicom's own check fails the PDU's decoding, which
    # aborts the association with a traceback. Our own AE titles are checked by config.py.
    pynetdicom_config.VALIDATORS["AE"] = _any_ae_title
    internals.configure(fast_paths=config.fast_paths)
    _register_storage_classes(config)


def _any_ae_title(value: str) -> tuple[bool, str]:
    return True, ""


def _register_storage_classes(config: NodeConfig) -> None:
    """Tell pynetdicom that the storage SOP classes it does not list (retired ones, newer
    ones and `extra_sop_classes`) are served by its Storage service class; without this it
    answers their C-STOREs "no supported service class" although the context was accepted."""
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import _STORAGE_CLASSES, register_uid

    known = set(_STORAGE_CLASSES.values())
    for uid in storage_sop_classes(config):
        if uid not in known:
            register_uid(uid, f"CompacsStorage_{uid.replace('.', '_')}", StorageServiceClass)
