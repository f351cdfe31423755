"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered and thumbnail.

The Accept header decides the syntax (media.choose): the stored bytes pass through when
asked with `transfer-syntax=*` or by their syntax; a private stored syntax and any syntax
not accepted are transcoded. A frame is cut from the stored encapsulated pixel data, or
decoded alone, never the whole object; a slice of a series volume is read by decoding only
its group (the archive service's volume reader).

Series metadata is built on the first request and kept in memory, keyed by the series'
signature (instance count, highest row id, sum of row versions), which any ingest,
replacement, compression swap or tier move of an instance changes: a changed series is
built again, an unchanged one answers from memory.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from compacs.service.web import dicomjson, media, multipart, render
from compacs.service.web.domain import Domain, Instance

JSON_TYPE = "application/dicom+json"


class NotFound(LookupError):
    """Nothing stored under the path (404)."""


class BadRequest(ValueError):
    """A path or parameter that cannot be read (400)."""


def root(request: Request) -> str:
    """The DICOMweb root as this caller reaches it (Host header kept: see OHIF.md)."""
    return str(request.base_url).rstrip("/") + "/dicomweb"


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


class Wado:
    def __init__(self, domain: Domain, cache_series: int = 64) -> None:
        self.domain = domain
        self._cache: OrderedDict[str, tuple[tuple[int, int, int], bytes]] = OrderedDict()
        self._cache_size = cache_series
        self._lock = threading.Lock()

    def _instances(self, study: str, series: str | None = None, sop: str | None = None) -> list:
        found = self.domain.instances(study, series, sop)
        if not found:
            what = "instance" if sop else "series" if series else "study"
            raise NotFound(f"no {what} {sop or series or study} in this archive")
        return found

    # --- whole instances --------------------------------------------------------------------
    def retrieve(
        self, request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> Response:
        instances = self._instances(study, series, sop)
        accepted = media.parse_accept(request.headers.get("accept"), media.DICOM)
        if not any(a.media_type in (media.DICOM, "*/*") for a in accepted):
            raise media.NotAcceptable(
                'instances are answered as multipart/related; type="application/dicom"'
            )
        # the first instance decides up front, so that a 406 comes before the body starts
        self._pick(instances[0], instances[0].stored_transfer_syntax, accepted, media.DICOM)
        boundary = multipart.new_boundary()

        def parts() -> Iterator[multipart.Part]:
            for inst in instances:
                part_type = f"{media.DICOM}; transfer-syntax="
                stored = inst.stored_transfer_syntax
                if self._pick(inst, stored, accepted, media.DICOM)[1] == stored:
                    streamed = self.domain.stream(inst)  # a big one, from its file
                    if streamed is not None:
                        chunks, length = streamed
                        yield multipart.Part(part_type + stored, chunks, length=length)
                        continue
                obj = self.domain.read(inst)
                _type, syntax = self._pick(obj.instance, obj.syntax, accepted, media.DICOM)
                yield multipart.Part(part_type + syntax, self.domain.part10(obj, syntax))

        return StreamingResponse(
            # a plain iterator: Starlette runs it in its thread pool, so each part's read
            # and transcode happen there, not on the event loop
            multipart.encode(parts(), boundary),
            media_type=multipart.content_type(boundary, media.DICOM),
        )

    def _pick(self, inst: Instance, stored: str, accepted: list, container: str) -> tuple[str, str]:
        """(part media type, syntax) of `inst`, whose bytes are in `stored`."""
        return media.choose(
            accepted,
            stored,
            self.domain.candidates(inst, stored),
            lambda ts: self.domain.producible(ts, stored),
            container=container,
        )

    # --- metadata ---------------------------------------------------------------------------
    def metadata(
        self, request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> Response:
        base = root(request)
        if series is not None and sop is None:
            body = self._series_metadata(base, study, series)
        else:
            items = [self._instance_json(base, i) for i in self._instances(study, series, sop)]
            body = json.dumps(items).encode()
        return Response(body, media_type=JSON_TYPE)

    def _series_metadata(self, base: str, study: str, series: str) -> bytes:
        signature = self.domain.series_signature(series)
        key = f"{base}|{study}|{series}"
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] == signature:
                self._cache.move_to_end(key)
                return cached[1]
        items = [self._instance_json(base, i) for i in self._instances(study, series)]
        body = json.dumps(items).encode()
        with self._lock:
            self._cache[key] = (signature, body)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return body

    def _instance_json(self, base: str, inst: Any) -> dict[str, Any]:
        ds = self.domain.header(inst)
        url = instance_url(
            base, inst.series.study.study_instance_uid, inst.series.series_instance_uid,
            inst.sop_instance_uid,
        )  # fmt: skip
        pixel_vr = None
        if inst.rows:
            pixel_vr = "OW" if int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
        return dicomjson.metadata(ds, lambda tag: f"{url}/bulkdata/{tag:08X}", pixel_vr)

    # --- frames and bulk data --------------------------------------------------------------
    def frames_at_once(self, request: Request, series: str, sop: str, **_: str) -> bool:
        """Whether this frame request is answered from a held row with the stored bytes as
        they are (Domain.held_instance, and an Accept that takes the stored syntax): work
        small enough for the event loop. Anything else goes to a worker thread."""
        inst = self.domain.held_instance(series, sop)
        if inst is None:
            return False
        stored = inst.stored_transfer_syntax
        header = request.headers.get("accept") or ""
        if "transfer-syntax=*" not in header and stored not in header:
            return False  # a decode or a transcode, or an image type: the worker's, surely
        accepted = media.parse_accept(header, media.OCTET)
        try:
            return self._pick(inst, stored, accepted, media.OCTET)[1] == stored
        except media.NotAcceptable:
            return False

    def frames(
        self, request: Request, study: str, series: str, sop: str, frame_list: str
    ) -> Response:
        try:
            numbers = [int(n) for n in frame_list.replace("%2C", ",").split(",") if n.strip()]
        except ValueError:
            raise BadRequest(
                f"frame list {frame_list!r}: give frame numbers from 1, separated by commas"
            ) from None
        if not numbers:
            raise BadRequest("no frame numbers: /frames/1 or /frames/1,3,5")
        inst = self.domain.instance(study, series, sop)
        if inst is None:
            raise NotFound(f"no instance {sop} in series {series} of study {study} in this archive")
        accepted = media.parse_accept(request.headers.get("accept"), media.OCTET)
        frames = None
        if inst.frame_first is None:  # its bytes are in the syntax the index says
            stored = inst.stored_transfer_syntax
            part_type, syntax = self._pick(inst, stored, accepted, media.OCTET)
            frames = self.domain.stored_frames(inst, numbers, syntax)
        if frames is None:
            obj = self.domain.read(inst)
            part_type, syntax = self._pick(obj.instance, obj.syntax, accepted, media.OCTET)
            frames = self.domain.frames(obj, numbers, syntax)
        url = instance_url(root(request), study, series, sop)
        parts = [
            multipart.Part(f"{part_type}; transfer-syntax={syntax}", data, f"{url}/frames/{n}")
            for n, data in zip(numbers, frames, strict=True)
        ]
        boundary = multipart.new_boundary()
        return Response(
            b"".join(multipart.encode(parts, boundary)),
            media_type=multipart.content_type(boundary, part_type, syntax),
        )

    def bulkdata(self, request: Request, study: str, series: str, sop: str, tag: str) -> Response:
        """A BulkDataURI of the metadata: the pixel data (all frames, in the syntax the
        Accept header allows; uncompressed by default) or another large binary value."""
        inst = self._instances(study, series, sop)[0]
        obj = self.domain.read(inst)
        try:
            number = int(tag, 16)
        except ValueError:
            raise NotFound(f"bulk data {tag!r}: not an 8-digit tag") from None
        boundary = multipart.new_boundary()
        if number == dicomjson.PIXEL_DATA:
            accepted = media.parse_accept(request.headers.get("accept"), media.OCTET)
            part_type, syntax = self._pick(obj.instance, obj.syntax, accepted, media.OCTET)
            count = int(obj.dataset.get("NumberOfFrames", 1) or 1)
            frames = self.domain.frames(obj, list(range(1, count + 1)), syntax)
            parts = [multipart.Part(f"{part_type}; transfer-syntax={syntax}", f) for f in frames]
        else:
            elem = obj.dataset.get(number)
            if elem is None or not isinstance(elem.value, bytes | bytearray):
                raise NotFound(f"instance {sop} has no bulk data element {tag}")
            part_type = media.OCTET
            parts = [multipart.Part(media.OCTET, bytes(elem.value))]
        return Response(
            b"".join(multipart.encode(parts, boundary)),
            media_type=multipart.content_type(boundary, part_type),
        )

    # --- rendered and thumbnail --------------------------------------------------------------
    def rendered(
        self,
        request: Request,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        frame: int = 1,
        thumbnail: bool = False,
    ) -> Response:
        kind = render.media_type(request.headers.get("accept"))
        if kind is None:
            raise media.NotAcceptable("rendered images are image/png or image/jpeg")
        instances = self._instances(study, series, sop)
        inst = instances[len(instances) // 2] if sop is None else instances[0]
        if not inst.rows:
            raise NotFound(f"instance {inst.sop_instance_uid} has no pixel data to render")
        obj = self.domain.read(inst)
        image = render.window(obj.dataset, self.domain.pixels(obj, frame))
        if thumbnail:
            image = render.thumbnail(image)
        return Response(render.encode(image, kind), media_type=kind)
