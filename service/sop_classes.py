"""The SOP classes the node stores: every storage SOP class of the DICOM dictionary and
those the config adds. Beside syntaxes.py, and protocol-free, because more than the SCP's
contexts need the list: pynetdicom's storage service is told about the classes it does
not know (dimse/settings.py), and a later web face (STOW-RS) would accept the same ones.
"""

from __future__ import annotations

from pydicom._uid_dict import UID_dictionary
from pynetdicom.sop_class import _STORAGE_CLASSES

from compacs.service.config import NodeConfig

# Not storage SOP classes although "Storage" is in their names.
_NOT_STORED = {
    "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
    "1.2.840.10008.1.20.2",  # Storage Commitment Pull Model (retired)
    "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR, a file only)
}


def storage_sop_classes(config: NodeConfig) -> list[str]:
    """Every storage SOP class of the DICOM dictionary, retired ones included (old
    ultrasound and NM systems still send them), and those of `[node] extra_sop_classes`."""
    dictionary = {
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and uid not in _NOT_STORED
    }
    return sorted(dictionary | set(_STORAGE_CLASSES.values()) | set(config.extra_sop_classes))
