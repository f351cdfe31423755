"""Prepared instances (wire.EncodedParts) in the shape pynetdicom's C-GET and C-MOVE loops
insist on: a Dataset. They read only its SOP Class and Instance UIDs and its file meta's
transfer syntax, then hand it to the association's send_c_store, which bulk_store replaces
for these so that the encoded parts are framed and sent as they are.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import UID

from compacs.service.wire import EncodedParts


class WireInstance(Dataset):
    """`encoded` as a Dataset holding only the UIDs pynetdicom reads; the content is in
    `encoded.parts`."""

    def __init__(self, encoded: EncodedParts) -> None:
        super().__init__()
        self.SOPClassUID = UID(encoded.sop_class_uid)
        self.SOPInstanceUID = UID(encoded.sop_instance_uid)
        self.file_meta = Dataset()
        self.file_meta.TransferSyntaxUID = UID(encoded.transfer_syntax)
        self.encoded = encoded

    def close(self) -> None:
        """Let go of the blob file of a streamed instance (after it was sent or not)."""
        self.encoded.close()
