"""Media types and transfer syntaxes of WADO-RS (PS3.18 8.7): what an Accept header asks
for, and which syntax answers it.

The rule, for frames and for whole instances alike: a `transfer-syntax=*` asks for the
stored syntax as it is (no decode), unless it is private (HEVC, learned), which never
leaves the node: then the first public syntax the object can be given in. An explicit
syntax, or an image media type's default one, is produced when it can be; a media type
without a syntax parameter means its default (PS3.18 Table 8.7.3-2/-5): explicit VR little
endian for application/dicom and application/octet-stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

EXPLICIT_LE = "1.2.840.10008.1.2.1"
OCTET = "application/octet-stream"
DICOM = "application/dicom"
ANY = "*"

# image media type of each compressed syntax (PS3.18 Table 8.7.4-1)
IMAGE_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# the syntax an image media type means when the request names none
IMAGE_DEFAULTS: dict[str, str] = {
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}


class NotAcceptable(ValueError):
    """No media type and syntax the request accepts can be produced (406)."""


@dataclass(frozen=True)
class Acceptable:
    media_type: str  # of the parts (the `type` of a multipart/related)
    syntax: str | None  # None: the type's default; "*": any, the stored one preferred


def parse_accept(header: str | None, default_type: str) -> list[Acceptable]:
    """The part types and syntaxes of an Accept header, in its order (q values are not
    weighed: viewers send one choice or a list in their order). `*/*` or no header: the
    resource's default type."""
    out: list[Acceptable] = []
    for entry in _split_outside_quotes(header or "", ","):
        fields = [f.strip() for f in _split_outside_quotes(entry, ";")]
        if not fields or not fields[0]:
            continue
        main = fields[0].lower()
        params: dict[str, str] = {}
        for field in fields[1:]:
            key, _, value = field.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        syntax = params.get("transfer-syntax") or None
        if main == "multipart/related":
            part = params.get("type", default_type).lower()
        elif main in ("*/*", "multipart/*"):
            part = default_type
        else:
            part = main
        out.append(Acceptable(part, syntax))
    return out or [Acceptable(default_type, None)]


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def choose(
    accepted: list[Acceptable],
    stored: str,
    candidates: list[str],
    producible: Callable[[str], bool],
    *,
    container: str,
) -> tuple[str, str]:
    """(media type, syntax) of the answer's parts for an object stored in `stored`.
    `candidates`: public syntaxes the object can be given in, best first; `container`:
    application/dicom (whole instances) or application/octet-stream (frames, bulk data),
    which image media types may stand in for when answering frames."""
    public_stored = stored if not stored.startswith("2.25.") else None
    for want in accepted:
        kind = want.media_type
        if kind == container or kind == "*/*":
            if want.syntax == ANY:
                if public_stored is not None:
                    return _typed(container, public_stored), public_stored
                return _typed(container, candidates[0]), candidates[0]
            syntax = want.syntax or EXPLICIT_LE
            if syntax == stored or producible(syntax):
                return _typed(container, syntax) if want.syntax else container, syntax
        elif container == OCTET and kind in IMAGE_DEFAULTS:
            if want.syntax == ANY and public_stored and IMAGE_TYPES.get(public_stored) == kind:
                return kind, public_stored
            syntax = want.syntax if want.syntax and want.syntax != ANY else IMAGE_DEFAULTS[kind]
            if IMAGE_TYPES.get(syntax) == kind and (syntax == stored or producible(syntax)):
                return kind, syntax
    asked = ", ".join(f"{a.media_type} ({a.syntax or 'default syntax'})" for a in accepted)
    raise NotAcceptable(
        f"cannot answer in any of: {asked}; this object can be given in "
        f"{', '.join(candidates)} (ask transfer-syntax=* for the stored one)"
    )


def _typed(container: str, syntax: str) -> str:
    """Frames in a compressed syntax go out typed by their image media type, as OHIF and
    Orthanc expect; whole instances stay application/dicom."""
    if container == OCTET and syntax in IMAGE_TYPES:
        return IMAGE_TYPES[syntax]
    return container
