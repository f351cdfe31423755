"""The codecs by name: one instance each, in a fixed order of general preference.

Frame codecs (`Codec`: one frame at a time, DICOM encapsulated) and volume codecs
(`VolumeCodec`: many frames together, volume.py) are listed apart: they are driven
differently. Importing this module teaches pydicom the JPEG XL transfer syntaxes.
"""

from __future__ import annotations

from . import pydicom_uids
from .base import Codec
from .hevc import HEVC
from .htj2k import HTJ2K
from .j2k import J2K
from .jpegls import JpegLS
from .jpegxl import JpegXL
from .learned import Learned
from .learned_volume import LearnedVolume
from .passthrough import Passthrough
from .rle import RLE
from .volume import VolumeCodec

pydicom_uids.register()

_CODECS: tuple[Codec, ...] = (JpegLS(), J2K(), HTJ2K(), JpegXL(), RLE(), Learned(), Passthrough())
_BY_NAME: dict[str, Codec] = {codec.name: codec for codec in _CODECS}


def register(codec: Codec) -> None:
    """Add a codec from outside compacs (a site's own; the tests' crashing one), before the
    config is read, so that rules can name it. It comes after the built-in codecs, so it never
    takes a transfer syntax over from them."""
    global _CODECS
    if codec.name in _BY_NAME:
        raise ValueError(f"a codec named {codec.name!r} is registered already")
    _CODECS = (*_CODECS, codec)
    _BY_NAME[codec.name] = codec


def names() -> list[str]:
    return [codec.name for codec in _CODECS]


def all_codecs() -> list[Codec]:
    return list(_CODECS)


def get(name: str) -> Codec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r} (known: {', '.join(names())})") from None


def by_transfer_syntax(uid: str) -> Codec | None:
    """The first available codec producing `uid`; None for unknown or empty UIDs."""
    for codec in _CODECS:
        if uid and codec.transfer_syntax_uid == uid and codec.is_available():
            return codec
    return None


_VOLUME_CODECS: tuple[VolumeCodec, ...] = (HEVC(), LearnedVolume())
_VOLUME_BY_NAME: dict[str, VolumeCodec] = {codec.name: codec for codec in _VOLUME_CODECS}


def volume_names() -> list[str]:
    return [codec.name for codec in _VOLUME_CODECS]


def get_volume(name: str) -> VolumeCodec:
    try:
        return _VOLUME_BY_NAME[name]
    except KeyError:
        known = ", ".join(volume_names())
        raise KeyError(f"unknown volume codec {name!r} (known: {known})") from None


def volume_by_transfer_syntax(uid: str) -> VolumeCodec | None:
    """The available volume codec whose private syntax is `uid` (a multi-frame instance
    coded as one volume); None otherwise."""
    for codec in _VOLUME_CODECS:
        if uid and codec.transfer_syntax_uid == uid and codec.is_available():
            return codec
    return None
