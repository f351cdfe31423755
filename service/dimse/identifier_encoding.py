"""C-FIND answer identifiers written straight to bytes, in the negotiated little-endian syntax.

pydicom's writer spent about a quarter of the node's CPU per C-FIND answer (py-spy over
198-answer study queries: 0.35 of 1.4 ms), and building the Dataset it writes another tenth.
An answer is a flat list of short strings and numbers whose tags, VRs and order are known
once per query, so the constant elements are encoded once (by pydicom) and each row's values
are written here. The bytes are exactly those pydicom writes for the Dataset that
``query.find`` yields for the same row: ``tests/test_find.py`` compares the two on every
query shape it runs. The query itself (plan and rows) is query.py's, the same for every face.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from compacs.service import query
from compacs.service.storage.index import Index

SPECIFIC_CHARACTER_SET = 0x00080005
UTF8 = "ISO_IR 192"

# VRs whose values are text written as such (padded to even length, backslash-separated).
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI"}
)
# Explicit VR: these have a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
# How encode() writes a target's value: text, a backslash-joined set, or by _element.
_TEXT, _SET, _OTHER = 0, 1, 2
_SETS_KEPT = 4096  # distinct set values remembered per query


def find_encoded(
    index: Index,
    identifier: Dataset,
    model: str,
    *,
    implicit_vr: bool,
    retrieve_ae_title: str | None = None,
    page_size: int = 1000,
) -> Iterator[bytes]:
    """query.find, with each answer already encoded in (implicit or explicit VR) little
    endian: what the C-FIND SCP sends, at a fraction of the cost of a Dataset written by
    pydicom. The bytes are those of query.find's Datasets. Raises query.QueryError before
    it returns, as query.find does."""
    plan = query.plan(index, identifier, model, retrieve_ae_title=retrieve_ae_title)
    return encoded_answers(plan, query.rows(index, plan, page_size), implicit_vr=implicit_vr)


def encoded_answers(
    plan: query.Plan, rows: Iterable[Sequence[Any]], *, implicit_vr: bool
) -> Iterator[bytes]:
    """The answer of each of a query's `rows` (query.rows), encoded."""
    encoder = IdentifierEncoder(
        plan.template,
        [Target(tag, vr, multi) for tag, vr, multi in plan.targets],
        plan.character_set,
        implicit_vr=implicit_vr,
    )
    return (encoder.encode(values) for values in rows)


@dataclass(frozen=True)
class Target:
    """A per-row value: its tag, VR and whether it is a backslash-joined set of values."""

    tag: int
    vr: str
    multi: bool = False


class IdentifierEncoder:
    """Encodes one C-FIND answer per row: the template's constant elements plus one element
    per target, in tag order, with Specific Character Set set to ISO_IR 192 when a value is
    not ASCII (values are stored decoded), else to ``character_set`` when the SCU asked."""

    def __init__(
        self,
        template: Dataset,
        targets: Sequence[Target],
        character_set: str | None,
        *,
        implicit_vr: bool,
    ) -> None:
        self.implicit_vr = implicit_vr
        self.targets = list(targets)
        constants: dict[int, bytes] = {
            int(elem.tag): self._pydicom_bytes(
                DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else elem.value)
            )
            for elem in template
        }
        target_tags = {t.tag for t in self.targets}
        # (tag, constant bytes or the index of the target) in tag order; a target replaces a
        # template element of the same tag, as in query.answer.
        slots: list[tuple[int, bytes | int]] = [
            (tag, data) for tag, data in constants.items() if tag not in target_tags
        ]
        slots += [(t.tag, i) for i, t in enumerate(self.targets)]
        slots.sort(key=lambda slot: slot[0])
        charset_default = constants.get(SPECIFIC_CHARACTER_SET)
        if character_set is not None:
            charset_default = self._text_element(SPECIFIC_CHARACTER_SET, "CS", character_set)
        self._charset_default = charset_default or b""
        self._charset_utf8 = self._text_element(SPECIFIC_CHARACTER_SET, "CS", UTF8)
        # One answer is b"".join of a list [targets' elements..., charset, constants...]
        # taken in tag order by one itemgetter: 10,000 answers of a universal study query
        # spent most of their time in per-element Python before (encode's loop is the rest).
        self._constants = [data for _, data in slots if isinstance(data, bytes)]
        n = len(self.targets)
        order: list[int] = []
        for tag, data in slots:
            if tag > SPECIFIC_CHARACTER_SET and n not in order:
                order.append(n)  # the charset slot, b"" when none is sent
            if isinstance(data, int):
                order.append(data)
            else:
                order.append(n + 1 + self._constants.index(data))
        if n not in order:
            order.append(n)
        self._in_tag_order = itemgetter(*order)
        # Per target: how to write it, the element's bytes before the value's length, the
        # length's struct, the pad byte and the element without a value.
        fmt = "<I" if implicit_vr else "<H"
        self._lengths = [struct.pack(fmt, length) for length in range(256)]
        self._length = struct.Struct(fmt).pack
        self._fast: list[tuple[int, bytes, bytes, bytes]] = []
        self._sets: dict[str, str] = {}  # a set's value as stored -> as answered
        for t in self.targets:
            kind = _OTHER if t.vr not in _TEXT_VRS else _SET if t.multi else _TEXT
            empty = self._header(t.tag, t.vr, 0)
            head = empty[: -len(self._lengths[0])]
            self._fast.append((kind, head, b"\0" if t.vr == "UI" else b" ", empty))

    def encode(self, values: Sequence[Any]) -> bytes:
        """The answer for one row (`values` in target order)."""
        parts: list[bytes] = []
        append = parts.append
        lengths = self._lengths
        sets = self._sets
        non_ascii = False
        for target, (kind, head, pad, empty), value in zip(
            self.targets, self._fast, values, strict=True
        ):
            if value is None or value == "":
                append(empty)
                continue
            if kind == _TEXT:
                if value.__class__ is not str:
                    text = str(value)
                else:
                    text = value
                    if not text.isascii():
                        non_ascii = True
            elif kind == _SET:
                text = sets.get(value)  # a few distinct sets (modalities) in many answers
                if text is None:
                    text = "\\".join(sorted({v for v in str(value).split("\\") if v}))
                    if len(sets) < _SETS_KEPT and isinstance(value, str):
                        sets[value] = text
            else:
                if isinstance(value, str) and not value.isascii():
                    non_ascii = True
                append(self._element(target.tag, target.vr, value))
                continue
            data = text.encode("utf-8")
            length = len(data)
            if length & 1:
                data += pad
                length += 1
            if length < 256:
                append(head + lengths[length] + data)
            elif length <= 0xFFFF or self.implicit_vr:
                append(head + self._length(length) + data)
            else:
                append(self._text_element(target.tag, target.vr, text))
        parts.append(self._charset_utf8 if non_ascii else self._charset_default)
        parts += self._constants
        return b"".join(self._in_tag_order(parts))

    # ------------------------------------------------------------------ elements

    def _element(self, tag: int, vr: str, value: Any) -> bytes:
        if value is None:
            return self._header(tag, vr, 0)
        if vr in _TEXT_VRS:
            text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
            return self._text_element(tag, vr, text)
        if vr == "US":
            numbers = value if isinstance(value, list) else [value]
            data = struct.pack(f"<{len(numbers)}H", *numbers)
            return self._header(tag, vr, len(data)) + data
        return self._pydicom_bytes(DataElement(tag, vr, value))  # not met in the index's keys

    def _text_element(self, tag: int, vr: str, text: str) -> bytes:
        # ASCII, or UTF-8 when the answer declares ISO_IR 192 (see encode)
        data = text.encode("utf-8")
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
        if len(data) > 0xFFFF and not self.implicit_vr:
            return self._pydicom_bytes(DataElement(tag, vr, text))
        return self._header(tag, vr, len(data)) + data

    def _header(self, tag: int, vr: str, length: int) -> bytes:
        group, element = tag >> 16, tag & 0xFFFF
        if self.implicit_vr:
            return struct.pack("<HHI", group, element, length)
        if vr in _LONG_VRS:
            return struct.pack("<HH2s2xI", group, element, vr.encode(), length)
        return struct.pack("<HH2sH", group, element, vr.encode(), length)

    def _pydicom_bytes(self, elem: DataElement) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit_vr
        write_data_element(fp, elem)
        return fp.getvalue()
