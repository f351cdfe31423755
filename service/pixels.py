"""An object's pixel data as frames, in the shared frame convention (codecs/base.py).

What every path that reads pixels shares: the compression runner before it encodes, the
transcoder, verify and fixity. An object in one of compacs' own syntaxes is decoded by its
codec, anything else by pydicom.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.pixels import iter_pixels

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat
from compacs.service import syntaxes


def source_frames(ds: Dataset) -> list[np.ndarray]:
    """The object's frames in the shared frame convention (codecs/base.py).

    An object in one of our own codecs' syntaxes is decoded by that codec, so that objects we
    stored and objects that arrived in that syntax read alike; anything else by pydicom.
    """
    fmt = PixelFormat.from_dataset(ds)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    codec = registry.by_transfer_syntax(syntax)
    if codec is not None:
        from pydicom.encaps import generate_frames

        frames = generate_frames(ds.PixelData, number_of_frames=fmt.number_of_frames)
        return [codec.decode_frame(f, fmt) for f in frames]
    volume = registry.volume_by_transfer_syntax(syntax)
    if volume is not None:  # one fragment: the frames coded together (a tier's volume form)
        from pydicom.encaps import generate_fragments

        return volume.decode_frames(b"".join(generate_fragments(ds.PixelData)), fmt)
    return [
        little_endian_frame(np.ascontiguousarray(f))
        for f in iter_pixels(ds, raw=True, decoding_plugin=pydicom_plugin(ds))
    ]


def little_endian_frame(frame: np.ndarray) -> np.ndarray:
    """pydicom gives big endian arrivals' frames in big endian dtypes; codecs take the bytes
    of a frame as little endian (the frame convention), so the values are kept, the order
    changed. Before this, every big endian arrival failed verification and stayed as sent."""
    if frame.dtype.byteorder == ">":
        return frame.astype(frame.dtype.newbyteorder("<"))
    return frame


def pydicom_plugin(ds: Dataset) -> str:
    # gdcm mis-decodes signed data with BitsStored < BitsAllocated (docs/design.md pitfalls).
    return "pylibjpeg" if syntaxes.is_encapsulated(str(ds.file_meta.TransferSyntaxUID)) else ""


def ours(syntax: str) -> bool:
    """Whether one of compacs' codecs decodes `syntax` (source_frames does, not pydicom)."""
    return (
        registry.by_transfer_syntax(syntax) is not None
        or registry.volume_by_transfer_syntax(syntax) is not None
    )
