"""Which store a tier's root names: a folder or a bucket (blobstore.py says what both offer).

Apart from blobstore.py so that the interface imports neither store: each store imports the
interface, and only this module knows both.
"""

from __future__ import annotations

from pathlib import Path

from compacs.service.storage.archive import Archive
from compacs.service.storage.blobstore import BlobStore, StoreSpec


def open_store(spec: StoreSpec) -> BlobStore:
    """The store `spec` names. boto3 is imported only for a bucket: a node without an
    object tier does not need it installed."""
    if spec.is_bucket:
        from compacs.service.storage.objectstore import ObjectStore

        return ObjectStore(spec)
    return Archive(Path(spec.root))
