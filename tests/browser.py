"""OHIF in a real headless Chromium, against any DICOMweb root on loopback.

What the browser tests need, and nothing that pytest owns (benchmarks and debugging sessions
use it too):

- :func:`ohif_dist`: OHIF's built viewer, ``npm pack @ohif/app@3.13.2`` once into a cache
  outside the repository (the tarball is 50 MB, ``dist/`` 204 MB: never committed);
- :class:`ViewerServer`: serves that ``dist/`` on a free loopback port with an
  ``app-config.js`` of ours, and forwards the DICOMweb root's path to the real server, so the
  viewer and DICOMweb share one origin (no CORS) and the server, which builds BulkDataURIs from
  the Host header, keeps writing URLs of the page's origin;
- :class:`Chromium` and :class:`DevTools`: Debian's Chromium (apt-get installs it when missing,
  under the same lock as tests/peers.py) driven over the DevTools protocol, which gives every
  request with its status, every console error, and screenshots.

Facts that shaped it (../shared/peers/OHIF.md has the long version): the bundled
app-config.js points at a public demo server and must be replaced; on a fresh profile an
onboarding tour covers the viewport unless ``ohif.tours`` is emptied; a screenshot at the load
event is all black, so we wait for the viewport's centre to hold an image; renders differ
slightly between runs, so images are judged by "not flat", never pixel for pixel.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import mimetypes
import os
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import peers

OHIF_PACKAGE = "@ohif/app@3.13.2"
OHIF_CACHE = Path(
    os.environ.get("COMPACS_OHIF_CACHE") or Path.home() / ".cache" / "compacs-tests" / "ohif"
)
CHROMIUM_PACKAGE = "chromium"

# Headers that belong to one hop of the connection and are never forwarded by the proxy.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}


# --------------------------------------------------------------------------- Chromium package


def chromium_binary() -> str | None:
    """Debian's Chromium launcher, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ensure_chromium() -> str:
    """The Chromium binary, installed with apt-get first when missing (the peers' lock, so two
    test sessions never run apt at once)."""
    found = chromium_binary()
    if found:
        return found
    with peers._file_lock(peers.STATE_DIR / "apt.lock"):
        if chromium_binary() is None:
            try:
                peers._apt_install([CHROMIUM_PACKAGE])
            except (OSError, subprocess.SubprocessError) as exc:
                raise peers.PeerError(
                    f"apt-get install {CHROMIUM_PACKAGE} failed: {exc}; install Debian's "
                    "chromium by hand or run on a machine that reaches the Debian mirror"
                ) from exc
    found = chromium_binary()
    if found is None:
        raise peers.PeerError(f"{CHROMIUM_PACKAGE} installed but no chromium on PATH")
    return found


# --------------------------------------------------------------------------- OHIF dist


def ohif_dist() -> Path:
    """OHIF's ``dist/`` folder, fetched with ``npm pack`` and unpacked on first use.

    The cache is shared by every worktree and test session of this user; a lock file
    serialises the first fetch, and ``.complete`` marks an unpacked tree (an interrupted
    unpack is started again, not used half-written).
    """
    version = OHIF_PACKAGE.rsplit("@", 1)[1]
    target = OHIF_CACHE / version
    dist = target / "dist"
    if (target / ".complete").exists():
        return dist
    OHIF_CACHE.mkdir(parents=True, exist_ok=True)
    with peers._file_lock(OHIF_CACHE / "fetch.lock"):
        if (target / ".complete").exists():
            return dist
        tarball = OHIF_CACHE / f"ohif-app-{version}.tgz"
        if not tarball.exists():
            npm = shutil.which("npm") or _apt_install_npm()
            res = subprocess.run(
                [npm, "pack", OHIF_PACKAGE, "--pack-destination", str(OHIF_CACHE)],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if res.returncode != 0 or not tarball.exists():
                raise peers.PeerError(
                    f"npm pack {OHIF_PACKAGE} failed ({res.returncode}): {res.stderr[-2000:]}"
                )
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            for member in members:
                member.name = member.name[len("package/") :]
            tar.extractall(target, members=members, filter="data")
        if not (dist / "index.html").exists():
            raise peers.PeerError(f"{tarball} holds no package/dist/index.html")
        (target / ".complete").touch()
    return dist


def _apt_install_npm() -> str:
    """npm, installed with apt-get (the peers' lock) when missing: it fetches OHIF."""
    with peers._file_lock(peers.STATE_DIR / "apt.lock"):
        if shutil.which("npm") is None:
            try:
                peers._apt_install(["npm"])
            except (OSError, subprocess.SubprocessError) as exc:
                raise peers.PeerError(
                    f"npm not found and apt-get install npm failed: {exc}; npm fetches OHIF's "
                    "built viewer (or put its dist/ in COMPACS_OHIF_CACHE by hand)"
                ) from exc
    npm = shutil.which("npm")
    if npm is None:
        raise peers.PeerError("npm installed but not on PATH")
    return npm


def app_config(dicomweb_path: str, router_basename: str | None = None) -> str:
    """OHIF's ``app-config.js`` with one DICOMweb data source at ``dicomweb_path`` of the
    page's own origin (the settings OHIF.md found to work offline, tours switched off).

    ``router_basename``: the path the viewer's routes live under (its study list there, not
    at ``/``): a server whose ``/`` is its own page, as compacs' status page is."""
    root = dicomweb_path.rstrip("/")
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "DICOMweb under test",
            "name": "dicomweb",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "dicomUploadEnabled": False,
            "singlepart": False,
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    roots = f"window.location.origin + {json.dumps(root)}"
    source_js = json.dumps(source, indent=2).replace(
        '"name": "dicomweb",',
        f'"name": "dicomweb",\n    "wadoUriRoot": {roots},\n'
        f'    "qidoRoot": {roots},\n    "wadoRoot": {roots},',
    )
    return f"""/** Written by tests/browser.py: one same-origin DICOMweb source at {root}. */
window.config = {{
  name: 'compacs-tests',
  routerBasename: {json.dumps(router_basename)},
  extensions: [],
  modes: [],
  customizationService: {{ 'ohif.tours': {{ $set: [] }} }},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'dicomweb',
  dataSources: [{source_js}],
}};
"""


def viewer_folder(
    dist: Path, folder: Path, dicomweb_path: str, router_basename: str | None = None
) -> Path:
    """A copy of OHIF's ``dist/`` for a server that serves the viewer itself (compacs'
    ``[web] viewer``), its ``app-config.js`` ours (:func:`app_config`).

    The files are hard links into the cache (204 MB, never copied); app-config.js is
    unlinked before it is written, so the cache's own stays the bundled one."""
    for src in dist.rglob("*"):
        dest = folder / src.relative_to(dist)
        if src.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:  # another file system: a copy, slower but the same
            shutil.copy2(src, dest)
    config = folder / "app-config.js"
    config.unlink(missing_ok=True)
    config.write_text(app_config(dicomweb_path, router_basename))
    return folder


# --------------------------------------------------------------------------- viewer server


class ViewerServer:
    """OHIF's ``dist/`` plus a reverse proxy for one DICOMweb root, on one loopback origin.

    Requests under the root's path go to the real server with the same path and the page's
    Host header; ``/app-config.js`` is ours; other paths are files of ``dist/``, and unknown
    paths without an extension are the single-page app's routes (``index.html``).
    Runs in threads of the calling process: it is scaffolding, not a peer under test.
    """

    def __init__(self, dist: Path, dicomweb_root: str, port: int | None = None) -> None:
        parsed = urllib.parse.urlsplit(dicomweb_root)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"DICOMweb root must be an http:// URL, got {dicomweb_root!r}")
        self.dist = dist.resolve()
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.root_path = parsed.path.rstrip("/") or "/"
        self.config_js = app_config(self.root_path).encode()
        self.port = port or peers.free_port()
        self.errors: list[str] = []
        self._httpd = ThreadingHTTPServer((peers.LOOPBACK, self.port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"ohif-{self.port}", daemon=True
        )

    @property
    def origin(self) -> str:
        return f"http://{peers.LOOPBACK}:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root as the page sees it (through the proxy)."""
        return self.origin + self.root_path

    def start(self) -> ViewerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the browser expects

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the DevTools protocol records every request already

            def do_GET(self) -> None:
                self._dispatch()

            def do_HEAD(self) -> None:
                self._dispatch()

            def do_POST(self) -> None:
                self._dispatch()

            def do_OPTIONS(self) -> None:
                self._dispatch()

            def _dispatch(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                try:
                    if path == server.root_path or path.startswith(server.root_path + "/"):
                        self._proxy()
                    elif path == "/app-config.js":
                        self._send(200, "application/javascript", server.config_js)
                    else:
                        self._static(urllib.parse.unquote(path))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser went away (navigation): nothing to answer
                except Exception as exc:  # noqa: BLE001  (recorded, then answered 502)
                    server.errors.append(f"{self.command} {self.path}: {exc!r}")
                    with contextlib.suppress(OSError):
                        self._send(502, "text/plain", f"viewer proxy: {exc!r}".encode())

            def _send(
                self, status: int, ctype: str, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _static(self, path: str) -> None:
                rel = path.lstrip("/")
                file = (server.dist / rel).resolve()
                if not file.is_relative_to(server.dist) or not file.is_file():
                    if "." in Path(rel).name:
                        self._send(404, "text/plain", f"no {path} in OHIF's dist/".encode())
                        return
                    file = server.dist / "index.html"  # a route of the single-page app
                ctype = "application/wasm" if file.suffix == ".wasm" else None
                ctype = ctype or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(200, ctype, file.read_bytes())

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn = http.client.HTTPConnection(*server.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for name, value in resp.getheaders():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler


# --------------------------------------------------------------------------- Chromium


class Chromium(peers.ManagedProcess):
    """Headless Chromium with a fresh profile, WebGL through SwiftShader, and the DevTools
    protocol on a loopback port (PID-recorded like every peer, so never left running)."""

    name = "chromium"
    graceful_teardown = False  # its profile is thrown away

    def __init__(self, workdir: Path, width: int = 1280, height: int = 900) -> None:
        super().__init__(Path(workdir) / "chromium.log", start_timeout=60.0)
        self.workdir = Path(workdir)
        self.binary = ensure_chromium()
        self.port = peers.free_port()
        self.size = (width, height)

    def command(self) -> list[str]:
        profile = self.workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        return [
            self.binary,
            "--headless=new",
            "--no-sandbox",  # root on CI machines
            "--disable-gpu",
            "--enable-unsafe-swiftshader",  # WebGL without a GPU: cornerstone needs it
            "--use-angle=swiftshader",
            f"--window-size={self.size[0]},{self.size[1]}",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={self.port}",
            "--remote-debugging-address=127.0.0.1",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--disable-extensions",
            "about:blank",
        ]

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def wait_ready(self) -> None:
        """Ready when the DevTools HTTP endpoint lists a page."""
        assert self.proc is not None
        peers.wait_for_port(self.host, self.port, self.start_timeout, self.proc, self.log_path)
        deadline = time.monotonic() + self.start_timeout
        while not self.page_targets():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise peers.PeerError(
                    f"Chromium lists no page on its DevTools port:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def page_targets(self) -> list[dict[str, Any]]:
        url = f"http://{self.host}:{self.port}/json/list"
        try:
            with peers._http.open(url, timeout=5) as resp:
                targets = json.loads(resp.read())
        except OSError:
            return []
        return [t for t in targets if t.get("type") == "page"]

    def devtools(self) -> DevTools:
        """A DevTools session on the browser's first page."""
        return DevTools(self.page_targets()[0]["webSocketDebuggerUrl"])


@dataclass
class Request:
    """One network request the page made, as the DevTools protocol reported it."""

    url: str
    method: str
    resource: str
    status: int | None = None
    mime: str = ""
    failed: str | None = None
    done: bool = False


@dataclass
class PageLog:
    """Everything a page did that a test judges: requests by id, console errors."""

    requests: dict[str, Request] = field(default_factory=dict)
    console_errors: list[str] = field(default_factory=list)

    def pending(self, prefix: str = "") -> list[Request]:
        return [r for r in self.requests.values() if not r.done and r.url.startswith(prefix)]

    def under(self, prefix: str) -> list[Request]:
        return [r for r in self.requests.values() if r.url.startswith(prefix)]


class DevTools:
    """A synchronous DevTools-protocol client: commands wait for their answer while the
    events that arrive meanwhile are folded into :attr:`log`."""

    def __init__(self, ws_url: str, timeout: float = 60.0) -> None:
        import websocket  # the websocket-client package (test extra)

        self._ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self._next_id = 0
        self.log = PageLog()
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; a protocol error raises with its text."""
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == ident:
                if "error" in msg:
                    raise peers.PeerError(f"DevTools {method} failed: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def pump(self, seconds: float) -> None:
        """Take in events for ``seconds`` (the page works meanwhile)."""
        import websocket

        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._ws.settimeout(left)
            try:
                self._event(json.loads(self._ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
        self._ws.settimeout(60.0)

    def _event(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        reqs = self.log.requests
        if method == "Network.requestWillBeSent":
            rid = p["requestId"]
            if rid in reqs and p.get("redirectResponse"):  # a redirect ends one hop
                hop = reqs.pop(rid)
                hop.status, hop.done = p["redirectResponse"]["status"], True
                reqs[f"{rid}#{len(reqs)}"] = hop
            reqs[rid] = Request(p["request"]["url"], p["request"]["method"], p.get("type", ""))
        elif method == "Network.responseReceived" and p["requestId"] in reqs:
            reqs[p["requestId"]].status = p["response"]["status"]
            reqs[p["requestId"]].mime = p["response"].get("mimeType", "")
        elif method == "Network.loadingFinished" and p["requestId"] in reqs:
            reqs[p["requestId"]].done = True
        elif method == "Network.loadingFailed" and p["requestId"] in reqs:
            reqs[p["requestId"]].failed = p.get("errorText") or "failed"
            reqs[p["requestId"]].done = True
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description", "")) for a in p.get("args", [])]
            self.log.console_errors.append("console.error: " + " ".join(map(str, args)))
        elif method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.log.console_errors.append(f"uncaught: {text}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            self.log.console_errors.append(
                f"{entry.get('source')}: {entry.get('text')} ({entry.get('url', '')})"
            )

    # ---- page actions

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise peers.PeerError(f"navigation to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable results)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise peers.PeerError(f"page script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def screenshot(self, clip: tuple[float, float, float, float] | None = None) -> bytes:
        """A PNG of the viewport, or of ``clip`` = (x, y, width, height) in CSS pixels."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            x, y, w, h = clip
            params["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])

    def wait_for(
        self, what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25
    ) -> Any:
        """Poll ``check`` (events pumped between polls) until it returns a true value."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: not seen within {timeout:.0f} s")
            self.pump(interval)

    def wait_network_idle(self, prefix: str, quiet: float = 1.0, timeout: float = 60.0) -> None:
        """Until no request under ``prefix`` has been open for ``quiet`` seconds (the
        viewer's frame loads are done), so the request list a test judges is complete.

        Only a prefix's requests: the scripts a web worker loads are announced to the page
        but answered in the worker's own DevTools target, so they never finish here."""
        deadline = time.monotonic() + timeout
        while True:
            count = len(self.log.requests)
            self.pump(quiet)
            if not self.log.pending(prefix) and len(self.log.requests) == count:
                return
            if time.monotonic() >= deadline:
                open_ = ", ".join(r.url for r in self.log.pending(prefix)[:5])
                raise TimeoutError(f"requests still open after {timeout:.0f} s: {open_}")


# --------------------------------------------------------------------------- images


def region_spread(png: bytes) -> float:
    """Standard deviation of the grey levels (0..255) of a PNG: ~0 for a flat (blank or
    black) region, tens for an image of anatomy."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(grey.std())


VIEWPORT_RECT_JS = """(() => {
  const cs = [...document.querySelectorAll('canvas.cornerstone-canvas')]
    .filter(c => c.width > 0 && c.height > 0);
  if (!cs.length) return null;
  const r = cs[0].getBoundingClientRect();
  return [r.x, r.y, r.width, r.height];
})()"""


def viewport_centre(tools: DevTools, fraction: float = 0.4) -> tuple[float, float, float, float]:
    """The centre ``fraction`` of the first cornerstone viewport (x, y, w, h), waiting for
    the viewport to exist."""
    x, y, w, h = tools.wait_for(
        "a cornerstone viewport", lambda: tools.evaluate(VIEWPORT_RECT_JS), timeout=60
    )
    cw, ch = w * fraction, h * fraction
    return (x + (w - cw) / 2, y + (h - ch) / 2, cw, ch)


@contextlib.contextmanager
def browser(workdir: Path) -> Iterator[DevTools]:
    """A fresh headless Chromium and a DevTools session on its page; killed afterwards."""
    chrome = Chromium(workdir).start()
    try:
        with chrome.devtools() as tools:
            yield tools
    finally:
        chrome.kill9()
