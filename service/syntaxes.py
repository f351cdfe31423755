"""The one table of transfer syntaxes: which the node accepts for storage (and in which order
it prefers them), which are lossy, and which it can produce from a stored object.

Everything that decides by syntax asks here: the SCP's contexts (dimse/scp.py), whether an
arrival is lossy (compress.py), what transcoding can write (transcode.py), which syntaxes a
retrieval may offer (retrieve.py).

Acceptance order, as pynetdicom accepts for each proposed context the first of ours the peer
proposed: the lossless syntaxes the node can also produce (the sender compresses; a C-GET
requestor, which takes the storage SCP role on the same contexts, gets a syntax every stored
object can be given in), then uncompressed, then lossless ones the node can only receive
(no encoder makes them), and the lossy ones last, so that a sender is never asked to
compress lossily what it offered uncompressed.
"""

from __future__ import annotations

from dataclasses import dataclass

from compacs.codecs import registry

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


@dataclass(frozen=True)
class Syntax:
    uid: str
    name: str
    lossy: bool
    accepted: bool = True  # for storage


TABLE: tuple[Syntax, ...] = (
    Syntax(JPEG_LS, "JPEG-LS Lossless", False),
    Syntax(J2K_LOSSLESS, "JPEG 2000 Lossless", False),
    Syntax("1.2.840.10008.1.2.4.201", "HTJ2K Lossless", False),
    Syntax("1.2.840.10008.1.2.4.110", "JPEG XL Lossless", False),
    Syntax("1.2.840.10008.1.2.5", "RLE Lossless", False),
    Syntax(EXPLICIT_LE, "Explicit VR Little Endian", False),
    Syntax(IMPLICIT_LE, "Implicit VR Little Endian", False),
    Syntax("1.2.840.10008.1.2.4.202", "HTJ2K Lossless RPCL", False),
    Syntax("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1", False),
    Syntax("1.2.840.10008.1.2.4.57", "JPEG Lossless", False),
    Syntax(DEFLATED_LE, "Deflated Explicit VR Little Endian", False),
    Syntax(EXPLICIT_BE, "Explicit VR Big Endian (retired)", False),
    Syntax("1.2.840.10008.1.2.4.203", "HTJ2K", True),
    Syntax("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", True),
    Syntax("1.2.840.10008.1.2.4.91", "JPEG 2000", True),
    Syntax("1.2.840.10008.1.2.4.50", "JPEG Baseline", True),
    Syntax("1.2.840.10008.1.2.4.51", "JPEG Extended", True),
    # lossy, never accepted for storage: recognised when an object says it is in them
    Syntax("1.2.840.10008.1.2.4.111", "JPEG XL JPEG Recompression", True, False),
    Syntax("1.2.840.10008.1.2.4.112", "JPEG XL", True, False),
    *(Syntax(f"1.2.840.10008.1.2.4.{n}", "MPEG/HEVC video", True, False) for n in range(100, 109)),
)
_BY_UID = {s.uid: s for s in TABLE}

STORAGE_ACCEPTED: tuple[str, ...] = tuple(s.uid for s in TABLE if s.accepted)
NATIVE: frozenset[str] = frozenset({EXPLICIT_LE, IMPLICIT_LE})  # what transcoding decodes to


def is_lossy(uid: str) -> bool:
    """Whether pixel data in `uid` may have been altered by a lossy process: by the table,
    or a codec of ours that is not lossless (a private syntax)."""
    known = _BY_UID.get(uid)
    if known is not None:
        return known.lossy
    codec = registry.by_transfer_syntax(uid)
    return codec is not None and not codec.lossless


def producible(uid: str, stored: str) -> bool:
    """Whether an object stored in `stored` can be given in `uid`: the stored bytes are in
    it, it is native, or an available lossless encoder makes it from the decoded pixels.
    The syntax an object arrived in is not enough: JPEG Lossless (.4.70) arrives, no encoder
    makes it."""
    if uid == stored or uid in NATIVE:
        return True
    codec = registry.by_transfer_syntax(uid)
    return codec is not None and codec.lossless and codec.is_available()


def is_encapsulated(uid: str) -> bool:
    """Whether pixel data in `uid` is encapsulated (compressed): every syntax but the native
    and deflated ones, compacs' private ones included (pydicom's UID properties raise for
    private syntaxes it was not told of)."""
    return uid not in NATIVE and uid not in (EXPLICIT_BE, DEFLATED_LE)


def is_private(uid: str) -> bool:
    """Our own syntaxes (2.25 UIDs) are for the archive only: never sent."""
    return not uid.startswith("1.2.840.10008.")
