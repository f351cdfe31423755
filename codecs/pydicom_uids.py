"""The JPEG XL transfer syntaxes (PS3.5 Supplement 232), taught to pydicom 3.0.2; and
compacs' private syntaxes, registered with pydicom's public API for private ones.

pydicom 3.0.2 predates them: `UID("1.2.840.10008.1.2.4.110").is_transfer_syntax` is False,
so `dcmwrite` refuses such a dataset and `is_compressed` raises. pydicom decides all of that
from one table, its private `pydicom._uid_dict.UID_dictionary` (name, type, info, retired,
keyword); an encapsulated syntax needs nothing else there (every transfer syntax that is not
one of the four native ones counts as compressed and encapsulated). pynetdicom extends the
same table for its own UIDs. This is the only module that reaches into it, and it does so only
for the pydicom version it was tested with: a later pydicom that knows the UIDs needs nothing,
another one without them gets a warning and is left alone.
"""

from __future__ import annotations

import logging

import pydicom
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID, register_transfer_syntax

log = logging.getLogger("compacs.codecs")

TESTED_PYDICOM = "3.0.2"

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"
JPEG_XL_JPEG_RECOMPRESSION = "1.2.840.10008.1.2.4.111"
JPEG_XL = "1.2.840.10008.1.2.4.112"

# The rows pydicom 3.1 and PS3.6 Table A-1 give them: (name, type, info, retired, keyword).
JPEG_XL_ENTRIES: dict[str, tuple[str, str, str, str, str]] = {
    JPEG_XL_LOSSLESS: ("JPEG XL Lossless", "Transfer Syntax", "", "", "JPEGXLLossless"),
    JPEG_XL_JPEG_RECOMPRESSION: (
        "JPEG XL JPEG Recompression",
        "Transfer Syntax",
        "",
        "",
        "JPEGXLJPEGRecompression",
    ),
    JPEG_XL: ("JPEG XL", "Transfer Syntax", "", "", "JPEGXL"),
}


def register() -> bool:
    """Make pydicom know the JPEG XL transfer syntaxes; True when it knows them afterwards.

    Idempotent. Called when `compacs.codecs.registry` is imported.
    """
    missing = {uid: row for uid, row in JPEG_XL_ENTRIES.items() if uid not in UID_dictionary}
    if not missing:
        return True
    if pydicom.__version__ != TESTED_PYDICOM:
        log.warning(
            "pydicom %s does not know the JPEG XL transfer syntaxes and compacs registers them "
            "only with pydicom %s: JPEG XL objects cannot be written or read",
            pydicom.__version__,
            TESTED_PYDICOM,
        )
        return False
    UID_dictionary.update(missing)
    return True


def private_syntax(uid: str) -> UID:
    """A private transfer syntax of compacs (Part-10 objects whose frames a private codec
    coded: encapsulated in explicit VR little endian, never sent to peers), registered so that
    pydicom reads and writes such files. The UID returned carries its encoding: file meta
    elements must hold it (a plain string of the same UID would not)."""
    return register_transfer_syntax(uid, implicit_vr=False, little_endian=True)
