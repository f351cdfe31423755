"""The ASGI application: DICOMweb under /dicomweb, the status page at /, an OHIF viewer's
files (`[web] viewer`) for every other path, [access] checked on each request, CORS for the
configured origins, and every user-caused error answered with a status and a message that
says what to change.

Handlers are plain functions: Starlette runs them in its thread pool, where the blocking
index reads, blob reads and decodes belong.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from compacs.service.config import NodeConfig
from compacs.service.web import auth, media, multipart, qido, status, stow
from compacs.service.web.domain import Domain, QueryError, RetrieveError, TranscodeError
from compacs.service.web.wado import JSON_TYPE, BadRequest, NotFound, Wado, root

log = logging.getLogger("compacs.web")

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")

_COLLECTIONS = {"studies", "series", "instances"}


def _service_of(request: Request) -> str | None:
    """The [access] service a request uses; None: no data behind it (viewer files)."""
    path = request.url.path
    if request.method == "POST":
        return "store"
    if path == "/":
        return "query"
    if not path.startswith("/dicomweb"):
        return None
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return "query" if last in _COLLECTIONS else "retrieve"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Errors as a JSON object whose message says what was wrong and what to do."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(config: NodeConfig, domain: Domain) -> Callable[..., Any]:
    wado = Wado(domain)
    web = config.web

    def guarded(
        handler: Callable[..., Response],
        at_once: Callable[..., bool] | None = None,
    ) -> Callable[[Request], Any]:
        """Access check, then the handler in the thread pool (on the event loop where
        `at_once` says the work is a local read), with user errors mapped."""

        async def endpoint(request: Request) -> Response:
            try:
                name = _authorise(request)
                if request.method == "POST":
                    body = await request.body()
                    return await run_in_threadpool(handler, request, name, body)
                if at_once is not None and at_once(request, **request.path_params):
                    return handler(request, **request.path_params)
                return await run_in_threadpool(handler, request, **request.path_params)
            except auth.Refusal as refused:
                headers = {"WWW-Authenticate": auth.CHALLENGE} if refused.status == 401 else None
                return _error(refused.status, refused.message, headers)
            except (NotFound, FileNotFoundError) as exc:
                return _error(404, str(exc))
            except (qido.SearchError, BadRequest, multipart.MultipartError, QueryError) as exc:
                return _error(400, getattr(exc, "reason", None) or str(exc))
            except RetrieveError as exc:
                return _error(400, exc.reason)
            except media.NotAcceptable as exc:
                return _error(406, str(exc))
            except stow.UnsupportedMedia as exc:
                return _error(415, str(exc))
            except IndexError as exc:  # a frame number past the last frame
                return _error(400, str(exc))
            except TranscodeError as exc:
                return _error(406, f"cannot give this object as asked: {exc}")

        return endpoint

    def _authorise(request: Request) -> str:
        name = auth.caller_name(request.headers.get("authorization"), web.users)
        service = _service_of(request)
        if service is not None:
            client = request.client.host if request.client else None
            server = request.scope.get("server")
            local = auth.is_local(client, server[0] if server else None)
            auth.check(config.access, service, name, client or "", local)
        return name

    # --- handlers ------------------------------------------------------------------------
    def search(request: Request, **path: str) -> Response:
        level = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        ds, offset, limit = qido.identifier(
            level, request.query_params.multi_items(), path.get("study"), path.get("series")
        )
        base = root(request)

        def retrieve_url(answer: Any) -> str:
            study = answer.get("StudyInstanceUID") or path.get("study")
            series = answer.get("SeriesInstanceUID") or path.get("series")
            sop = answer.get("SOPInstanceUID")
            if level == "studies":
                return f"{base}/studies/{study}"
            if level == "series":
                return f"{base}/studies/{study}/series/{series}"
            return f"{base}/studies/{study}/series/{series}/instances/{sop}"

        items, more = qido.answers(domain.find(ds), offset, limit, retrieve_url)
        headers = {}
        if more:
            headers["Warning"] = '299 compacs "There are additional results that can be requested"'
        if not items:
            return Response(status_code=204, headers=headers)
        return Response(json.dumps(items).encode(), media_type=JSON_TYPE, headers=headers)

    def store(request: Request, name: str, body: bytes) -> Response:
        code, answer = stow.store(
            domain,
            request.headers.get("content-type", ""),
            body,
            name,
            root(request),
            request.path_params.get("study"),
        )
        return Response(json.dumps(answer).encode(), status_code=code, media_type=JSON_TYPE)

    def retrieve(request: Request, **path: str) -> Response:
        return wado.retrieve(request, **path)

    def metadata(request: Request, **path: str) -> Response:
        return wado.metadata(request, **path)

    def frames(request: Request, **path: str) -> Response:
        return wado.frames(request, **path)

    def bulk(request: Request, **path: str) -> Response:
        return wado.bulkdata(request, **path)

    def rendered(request: Request, **path: str) -> Response:
        frame = int(path.pop("frame", 1))
        return wado.rendered(request, frame=frame, **path)

    def thumbnail(request: Request, **path: str) -> Response:
        return wado.rendered(request, thumbnail=True, **path)

    def status_page(request: Request) -> Response:
        return HTMLResponse(status.page(domain))

    g = guarded
    frames_endpoint = g(frames, wado.frames_at_once)
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{sop}"
    dicomweb = [
        Route("/studies", g(search), methods=["GET"]),
        Route("/studies", g(store), methods=["POST"]),
        Route("/series", g(search), methods=["GET"]),
        Route("/instances", g(search), methods=["GET"]),
        Route(study, g(retrieve), methods=["GET"]),
        Route(study, g(store), methods=["POST"]),
        Route(study + "/series", g(search), methods=["GET"]),
        Route(study + "/instances", g(search), methods=["GET"]),
        Route(study + "/metadata", g(metadata), methods=["GET"]),
        Route(study + "/rendered", g(rendered), methods=["GET"]),
        Route(study + "/thumbnail", g(thumbnail), methods=["GET"]),
        Route(series, g(retrieve), methods=["GET"]),
        Route(series + "/instances", g(search), methods=["GET"]),
        Route(series + "/metadata", g(metadata), methods=["GET"]),
        Route(series + "/rendered", g(rendered), methods=["GET"]),
        Route(series + "/thumbnail", g(thumbnail), methods=["GET"]),
        Route(instance, g(retrieve), methods=["GET"]),
        Route(instance + "/metadata", g(metadata), methods=["GET"]),
        Route(instance + "/rendered", g(rendered), methods=["GET"]),
        Route(instance + "/thumbnail", g(thumbnail), methods=["GET"]),
        Route(instance + "/frames/{frame_list}", frames_endpoint, methods=["GET"]),
        Route(instance + "/frames/{frame:int}/rendered", g(rendered), methods=["GET"]),
        Route(instance + "/bulkdata/{tag}", g(bulk), methods=["GET"]),
    ]
    routes: list[Any] = [
        Route("/", g(status_page), methods=["GET"]),
        Mount("/dicomweb", routes=dicomweb),
    ]
    if web.viewer is not None:
        routes.append(Route("/{path:path}", _viewer(web.viewer), methods=["GET"]))
    middleware = []
    if web.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(web.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Accept", "Content-Type"],
                expose_headers=["Content-Location", "Warning", "Content-Type"],
            )
        )
    return _frames_first(Starlette(routes=routes, middleware=middleware), frames_endpoint)


# A viewer's frame requests, hundreds per series: straight to their endpoint (the same
# access check and error answers), past Starlette's router and middleware, which were a
# tenth of a frame's time. A request with an Origin goes the whole way, for CORS.
_FRAMES = re.compile(
    r"^/dicomweb/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)"
    r"/instances/(?P<sop>[^/]+)/frames/(?P<frame_list>[^/]+)$"
)


def _frames_first(app: Starlette, frames: Callable[[Request], Any]) -> Callable[..., Any]:
    async def asgi(scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            found = _FRAMES.match(scope["path"])
            if found and not any(name == b"origin" for name, _ in scope["headers"]):
                scope["path_params"] = found.groupdict()
                response = await frames(Request(scope, receive))
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi


def _viewer(folder: Path) -> Callable[[Request], Any]:
    """A single-page app's files: a path naming a file answers it, any other path (the
    viewer's own routes, /viewer?StudyInstanceUIDs=...) answers index.html."""
    base = folder.resolve()

    async def serve(request: Request) -> Response:
        wanted = (base / request.path_params["path"]).resolve()
        if wanted.is_relative_to(base) and wanted.is_file():
            return FileResponse(wanted)
        if Path(request.path_params["path"]).suffix:  # a missing asset, not a route
            return _error(404, f"{request.url.path}: no such file in the viewer folder")
        return FileResponse(base / "index.html", media_type="text/html")

    return serve
