"""Changing a stored object's transfer syntax on the way out (export, and later retrieval).

Decoding to a native syntax goes through pydicom's decoders, which also fix up the
attributes that decompression changes (Photometric Interpretation of YBR JPEG, Planar
Configuration). Encoding into one of our codecs' syntaxes goes through the same verified
runner as ingest, so nothing leaves the node that was not checked bit-exact.
"""

from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service.compress import encode_dataset, is_lossy, source_frames

NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
}


class TranscodeError(ValueError):
    """The object cannot be given in the requested syntax (the message says why)."""


def transcode(data: bytes, target: str) -> bytes:
    """`data` (Part-10 bytes) in transfer syntax `target`; unchanged if already in it."""
    ds = dcmread(BytesIO(data))
    current = str(ds.file_meta.TransferSyntaxUID)
    if current == target:
        return data
    has_pixels = "PixelData" in ds
    if target in NATIVE_SYNTAXES:
        if has_pixels and UID(current).is_compressed:
            ds.decompress(generate_instance_uid=False)
        elif has_pixels and current == "1.2.840.10008.1.2.2":
            raise TranscodeError("big endian pixel data is only given as received")
        ds.file_meta.TransferSyntaxUID = UID(target)
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()
    codec = registry.by_transfer_syntax(target)
    if codec is None or not codec.lossless or not codec.is_available():
        raise TranscodeError(f"cannot encode transfer syntax {target}")
    if not has_pixels:
        raise TranscodeError(f"{target} is an image syntax and this object has no pixel data")
    if is_lossy(ds):
        raise TranscodeError("a lossy object is never re-encoded into another compressed syntax")
    reason = codec.unsupported_reason(PixelFormat.from_dataset(ds))
    if reason:
        raise TranscodeError(f"{codec.name} cannot take this image: {reason}")
    return encode_dataset(ds, codec, source_frames(ds), {})
