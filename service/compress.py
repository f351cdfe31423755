"""The runner behind every codec: try a rule's codecs in order on one object in memory.

Invariant 2 holds through it: every encode is verified (encode.py) before its result can be
stored; a mismatch or an error falls through to the next codec of the rule and finally to
storing the object exactly as received. The codec choice here (`usable_codecs`,
`kept_as_received`) is shared with the runner for big objects (compress_file.py). Nothing in
this module touches the index, so it runs in worker processes as easily as in the CLI.

The names that used to live here (frames: pixels.py; encoding and verifying them: encode.py)
are re-exported, so that callers keep one import for the runner and its parts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pydicom import Dataset

from compacs.codecs import registry
from compacs.codecs.base import Codec, PixelFormat
from compacs.service import syntaxes
from compacs.service.encode import (
    LOSSY_METHOD,
    Derived,
    RawLayout,
    derive,
    encode_dataset,
    encoded_dataset,
    encoded_frames,
    little_endian_words,
    part10,
    raw_layout,
    shallow_copy,
    with_frames,
)
from compacs.service.pixels import ours, source_frames
from compacs.service.rules import CodecChoice

__all__ = [
    "LOSSY_METHOD",
    "NOT_A_CODEC_FAILURE",
    "Derived",
    "Outcome",
    "RawLayout",
    "compress",
    "derive",
    "encode_dataset",
    "encoded_dataset",
    "encoded_frames",
    "is_lossy",
    "kept_as_received",
    "little_endian_words",
    "ours",
    "part10",
    "raw_layout",
    "shallow_copy",
    "source_frames",
    "with_frames",
]

log = logging.getLogger("compacs.compress")


@dataclass
class Outcome:
    """What the runner decided for one object."""

    data: bytes  # the Part-10 bytes to store
    codec: str  # the codec that produced `data`; "passthrough" when stored as received
    transfer_syntax: str
    notes: list[str] = field(default_factory=list)  # why earlier codecs were not used
    fallbacks: int = 0  # codec attempts that failed (error or verification mismatch)
    # Set when the pixel data as received does not decode: the object is kept as received
    # and the index flags it (a damaged or mutated compressed arrival).
    source_error: str | None = None
    derived: Derived | None = None  # a bounded-error result, a new instance


# What a failing codec may raise and still count as a failed attempt. Native extensions
# panic too: pyo3's PanicException (the RLE decoder on a frame shorter than its header
# says) derives from BaseException, not Exception. Only a request to stop is let through.
NOT_A_CODEC_FAILURE = (KeyboardInterrupt, SystemExit, GeneratorExit)


class Passthrough(Protocol):
    """What both runners' outcomes record when they keep an object as received."""

    notes: list[str]
    fallbacks: int
    source_error: str | None


def is_lossy(ds: Dataset) -> bool:
    """Stored exactly as received, never decoded and re-encoded: PS3.3 C.7.6.1.1.5 would then
    demand a new SOP Instance UID, and the loss would compound."""
    return syntaxes.is_lossy(str(ds.file_meta.TransferSyntaxUID)) or (
        str(ds.get("LossyImageCompression", "")).strip() == "01"
    )


def kept_as_received(ds: Dataset) -> str | None:
    """Why no codec is even tried on this object (None: the rule's codecs are): the one
    decision `compress` and `compacs rules explain` share."""
    if "PixelData" not in ds:
        return "no pixel data"
    if is_lossy(ds):
        return "lossy arrival: stored as received"
    return None


def pixel_format(ds: Dataset, passthrough: Passthrough) -> PixelFormat | None:
    """The image attributes every codec needs; None when they cannot be read, recorded as
    `passthrough`'s source error, so that the object is kept as received and flagged."""
    try:
        return PixelFormat.from_dataset(ds)
    except (AttributeError, TypeError, ValueError) as exc:
        passthrough.source_error = f"image attributes cannot be read: {describe(exc)}"
        passthrough.notes.append(passthrough.source_error)
        return None


def fell_back(passthrough: Passthrough, codec: Codec, ds: Dataset, exc: BaseException) -> None:
    """A codec attempt failed and the next one is tried: counted and noted on the outcome
    (jobs audits it as a codec_fallback) and logged for the administrator."""
    passthrough.fallbacks += 1
    passthrough.notes.append(f"{codec.name} failed: {describe(exc)}")
    log.warning("codec %s failed on %s: %s", codec.name, ds.SOPInstanceUID, exc)


def usable_codecs(
    choices: list[CodecChoice] | tuple[CodecChoice, ...],
    fmt: PixelFormat,
    received_ts: str,
    notes: list[str],
) -> Iterator[tuple[CodecChoice, Codec]]:
    """The rule's codecs that may be tried on this object, in the rule's order, for
    `compress` and `compress_file` alike: it stops at a passthrough choice or at the syntax
    the object arrived in (nothing after them is tried), and notes in `notes` why each
    skipped codec was not tried, so that the outcome explains itself."""
    for choice in choices:
        codec = registry.get(choice.name)
        if not codec.transfer_syntax_uid:  # passthrough: keep as received
            return
        if codec.transfer_syntax_uid == received_ts:
            notes.append(f"{codec.name}: arrived in that syntax already")
            return
        reason = codec.unsupported_reason(fmt) if codec.is_available() else "not available"
        if reason:
            notes.append(f"{codec.name}: {reason}")
            continue
        yield choice, codec


def compress(
    raw: bytes, ds: Dataset, choices: list[CodecChoice] | tuple[CodecChoice, ...]
) -> Outcome:
    """Apply a rule's codec choices to one received Part-10 object (`ds` is `raw` parsed)."""
    received_ts = str(ds.file_meta.TransferSyntaxUID)
    passthrough = Outcome(raw, "passthrough", received_ts)
    why = kept_as_received(ds)
    if why is not None:
        passthrough.notes.append(why)
        if "PixelData" not in ds:
            return passthrough
        try:  # never re-encoded; but an administrator should hear of pixels that don't decode
            source_frames(ds)
        except BaseException as exc:
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            passthrough.source_error = f"pixel data does not decode: {describe(exc)}"
        return passthrough
    fmt = pixel_format(ds, passthrough)
    if fmt is None:
        return passthrough
    layout = raw_layout(raw, ds)  # before the pixels are read: offsets are still known
    splice = (raw, layout) if layout is not None else None
    frames: list[np.ndarray] | None = None
    outcome = passthrough
    for choice, codec in usable_codecs(choices, fmt, received_ts, passthrough.notes):
        if frames is None:
            try:
                frames = source_frames(ds)
            except BaseException as exc:
                if isinstance(exc, NOT_A_CODEC_FAILURE):
                    raise
                passthrough.source_error = f"pixel data does not decode: {describe(exc)}"
                passthrough.notes.append(passthrough.source_error)
                break
        try:
            data, derived = encode_dataset(ds, codec, frames, choice.params, splice)
        except BaseException as exc:  # any codec failure must fall back, never lose the object
            if isinstance(exc, NOT_A_CODEC_FAILURE):
                raise
            fell_back(passthrough, codec, ds, exc)
            continue
        if len(data) >= len(raw):
            passthrough.notes.append(f"{codec.name}: no gain ({len(data)} >= {len(raw)} bytes)")
            continue
        outcome = Outcome(
            data,
            codec.name,
            codec.transfer_syntax_uid,
            passthrough.notes,
            passthrough.fallbacks,
            derived=derived,
        )
        break
    return outcome


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
