"""Facts read from a stored Part-10 object's bytes without parsing its data set with pydicom:
its transfer syntax, its pixel module, and the frames of the encapsulated pixel data that
ends it.

Why: a web viewer asks one frame per request, hundreds per series, and pydicom's read of an
object's header was a fifth of such a request (bench/dicomweb.py). Each reader here accepts
only the layout it understands (explicit VR little endian, as every encapsulated syntax and
the file meta group are) and answers None for anything else, for the caller to parse the
object the ordinary way: a fast answer or none, never a guess.
"""

from __future__ import annotations

import struct

from compacs.codecs.base import PixelFormat
from compacs.service.wire import Buffer

# Explicit VR little endian, as every encapsulated syntax is: Pixel Data, OB (or OW, which
# some writers give it), undefined length
_PIXEL_DATA_ENCAPSULATED = (
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",
    b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff",
)
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"


_TRANSFER_SYNTAX_UID = b"\x02\x00\x10\x00UI"  # in the file meta group, explicit VR LE


def file_syntax(raw: bytes) -> str | None:
    """The Transfer Syntax UID of a Part-10 object's file meta group, read from its bytes:
    a row read a moment ago (web/series_rows.py) may name a syntax the object is no longer in
    (compressed or recompressed since, the file read being the new one)."""
    at = raw.find(_TRANSFER_SYNTAX_UID, 132, 132 + 1024)
    if at < 0:
        return None
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    return raw[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii", "replace")


def trailing_frames(raw: bytes, count: int) -> list[Buffer] | None:
    """The frames of encapsulated pixel data that ends the object, found from its item
    headers alone, without parsing the data set (a viewer's frame request; pydicom's read of
    the header was a fifth of it). None where this does not apply, for the caller to parse:
    native pixel data, anything after the pixel data, fragments that are not one per frame.
    The item headers must tile the rest of the object exactly and end it with the sequence
    delimiter, so that bytes inside a fragment that look like the Pixel Data tag (the last
    match is taken) cannot be mistaken for it."""
    at = max(raw.rfind(header) for header in _PIXEL_DATA_ENCAPSULATED)
    if at < 0:
        return None
    view = memoryview(raw)
    end = len(raw)
    pos = at + 12
    items: list[Buffer] = []
    while True:
        if pos + 8 > end:
            return None
        tag = raw[pos : pos + 4]
        length = int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if tag == _SEQUENCE_END:
            if length != 0 or pos + 8 != end:
                return None
            break
        if tag != _ITEM or length == 0xFFFFFFFF or pos + 8 + length > end:
            return None
        items.append(view[pos + 8 : pos + 8 + length])
        pos += 8 + length
    fragments = items[1:]  # after the Basic Offset Table
    if not fragments:
        return None
    if count == 1:
        return [fragments[0] if len(fragments) == 1 else b"".join(fragments)]
    return fragments if len(fragments) == count else None


# The Image Pixel module's attributes PixelFormat needs, (group, element) -> field
_PIXEL_MODULE = {
    (0x0028, 0x0002): "samples_per_pixel",
    (0x0028, 0x0004): "photometric_interpretation",
    (0x0028, 0x0008): "number_of_frames",
    (0x0028, 0x0010): "rows",
    (0x0028, 0x0011): "columns",
    (0x0028, 0x0100): "bits_allocated",
    (0x0028, 0x0101): "bits_stored",
    (0x0028, 0x0103): "pixel_representation",
}
_LAST_WANTED = (0x0028, 0x0103)
# VRs whose explicit-VR header has a 4-byte length after two reserved bytes (PS3.5 7.1.2)
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)


def pixel_format(raw: bytes) -> PixelFormat | None:
    """The pixel module of the object's top-level data set, by walking its element headers
    up to group 0028 (values skipped by their lengths, sequences by their items): what
    decoding a frame needs, without pydicom's parse. None where the walk meets what it does
    not read (implicit VR, UN of undefined length, a malformed header) or a value is
    missing."""
    if raw[128:132] != b"DICM" or raw[132:138] != b"\x02\x00\x00\x00UL":
        return None
    pos = 144 + int.from_bytes(raw[140:144], "little")  # after the file meta group
    found: dict[str, bytes] = {}
    try:
        while pos + 8 <= len(raw):
            group, element = struct.unpack_from("<HH", raw, pos)
            if (group, element) > _LAST_WANTED:
                break
            pos, value = _element(raw, pos)
            field = _PIXEL_MODULE.get((group, element))
            if field is not None and value is not None:
                found[field] = value
    except (ValueError, IndexError, struct.error):
        return None
    try:
        return PixelFormat(
            rows=_us(found["rows"]),
            columns=_us(found["columns"]),
            samples_per_pixel=_us(found.get("samples_per_pixel", b"\x01\x00")),
            bits_allocated=_us(found["bits_allocated"]),
            bits_stored=_us(found.get("bits_stored", found["bits_allocated"])),
            pixel_representation=_us(found.get("pixel_representation", b"\x00\x00")),
            photometric_interpretation=_text(found.get("photometric_interpretation", b"")),
            number_of_frames=int(_text(found.get("number_of_frames", b"")) or 1),
        )
    except (KeyError, ValueError):
        return None


def _element(raw: bytes, pos: int) -> tuple[int, bytes | None]:
    """The element at `pos`: where the next one starts, and its value (None for a
    sequence). Raises ValueError for what this walk does not read."""
    vr = raw[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        length = int.from_bytes(raw[pos + 8 : pos + 12], "little")
        value_at = pos + 12
    elif vr.isalpha() and vr.isupper():
        length = int.from_bytes(raw[pos + 6 : pos + 8], "little")
        value_at = pos + 8
    else:
        raise ValueError("not explicit VR")
    if length == _UNDEFINED:
        if vr != b"SQ":
            raise ValueError("undefined length outside a sequence")
        return _skip_items(raw, value_at), None
    if vr == b"SQ":
        return value_at + length, None
    end = value_at + length
    if end > len(raw):
        raise ValueError("value past the end")
    return end, raw[value_at:end]


def _skip_items(raw: bytes, pos: int) -> int:
    """Past a sequence of undefined length starting at its first item."""
    while True:
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if (group, element) == _SEQ_END:
            return pos
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError("not an item")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # the item's elements, to its delimiter
            if struct.unpack_from("<HH", raw, pos) == _ITEM_END:
                pos += 8
                break
            pos, _ = _element(raw, pos)


def _us(value: bytes) -> int:
    if len(value) < 2:
        raise ValueError("US value too short")
    return int.from_bytes(value[:2], "little")


def _text(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii").strip()
