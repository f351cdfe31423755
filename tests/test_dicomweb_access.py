"""The web face's access rules and TLS against a real node: [access] applied to HTTP
callers named by [web] users (Basic or Bearer), closed to nameless callers when local
callers are not trusted, HTTPS with the [tls] certificate; and [web] config mistakes, each
named with its file, key and what is allowed."""

from __future__ import annotations

import hashlib
import ssl
import sys
from pathlib import Path

import httpx
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicomdata  # noqa: E402
import peers  # noqa: E402
from test_tls import pki  # noqa: E402, F401  (the module's CA, node and client certificates)

from compacs.service.config import ConfigError, load_config  # noqa: E402

pytestmark = pytest.mark.peers


def _sha(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def _stow_body(path: Path, boundary: str = "xyz") -> tuple[bytes, dict[str, str]]:
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
    }


def test_access_over_https(make_node, pki: Path, tmp_path: Path) -> None:  # noqa: F811
    web_port = peers.free_port()
    config = f"""
[access]
local_callers = false
query = ["VIEWER", "ARCHIVIST"]
retrieve = ["VIEWER"]
store = ["ARCHIVIST"]

[tls]
certificate = "{pki / "node.pem"}"
key = "{pki / "node.key"}"

[web]
port = {web_port}
tls = true
cors_origins = ["https://viewer.example"]
users = {{ VIEWER = "{_sha("viewer-pw")}", ARCHIVIST = "{_sha("token-123")}" }}
"""
    make_node(config)
    url = f"https://127.0.0.1:{web_port}/dicomweb"
    ca = ssl.create_default_context(cafile=pki / "ca.pem")
    # no idle keep-alive connection left: the node's stop would wait for it (5 s)
    close = {"Connection": "close"}
    viewer = httpx.Client(verify=ca, auth=("VIEWER", "viewer-pw"), headers=close)
    archivist = httpx.Client(verify=ca, headers={"Authorization": "Bearer token-123", **close})
    nobody = httpx.Client(verify=ca, headers=close)

    sample = dicomdata.fresh_copy("CT_small.dcm", tmp_path / "in")
    ds = pydicom.dcmread(sample)
    body, headers = _stow_body(sample)
    refused = nobody.post(f"{url}/studies", content=body, headers=headers)
    assert refused.status_code == 401 and "[access] store" in refused.json()["error"]
    assert "Basic" in refused.headers["www-authenticate"]
    assert viewer.post(f"{url}/studies", content=body, headers=headers).status_code == 403
    assert archivist.post(f"{url}/studies", content=body, headers=headers).status_code == 200

    assert nobody.get(f"{url}/studies").status_code == 401
    wrong = httpx.get(f"{url}/studies", verify=ca, auth=("VIEWER", "nope"))
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.json()["error"]
    found = viewer.get(f"{url}/studies", params={"StudyInstanceUID": ds.StudyInstanceUID})
    assert found.status_code == 200 and len(found.json()) == 1
    assert archivist.get(f"{url}/studies").status_code == 200  # query: listed
    metadata = f"{url}/studies/{ds.StudyInstanceUID}/metadata"
    assert archivist.get(metadata).status_code == 403  # retrieve: not listed
    assert viewer.get(metadata).json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]
    # frames take a shorter way through the web face (app._frames_first): the same checks
    frame = (
        f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1"
    )
    assert nobody.get(frame).status_code == 401
    assert archivist.get(frame).status_code == 403
    assert viewer.get(frame).status_code == 200
    assert viewer.get(frame).status_code == 200  # its series' rows held now: the loop answers
    crossed = viewer.get(frame, headers={"Origin": "https://viewer.example"})
    assert crossed.status_code == 200
    assert crossed.headers["access-control-allow-origin"] == "https://viewer.example"
    # CORS: the configured origin is answered, preflight included
    preflight = nobody.options(
        f"{url}/studies",
        headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"
    # plain HTTP on the TLS port gets nothing
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{web_port}/dicomweb/studies", timeout=5)


@pytest.mark.parametrize(
    ("web", "expected"),
    [
        ("port = 70000", "[web] port: must be an integer from 0 to 65535"),
        ('cors_origins = "*"', "[web] cors_origins: must be a list of origins"),
        ('users = { VIEWER = "secret" }', '[web] users.VIEWER: must be "sha256:"'),
        ("port = 8042\ntls = true", "[web] tls = true: set [tls] certificate and key"),
        ('viewer = "/nonexistent"', "no index.html there"),
        ("colour = 1", "[web] has unknown key(s) colour; allowed keys:"),
    ],
)
def test_bad_web_config_names_file_key_and_what_to_do(
    tmp_path: Path, web: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[web]\n{web}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in str(err.value) and expected in str(err.value)


def test_web_port_on_a_dicom_port_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--web-port = 11112 is already a DICOM"):
        load_config(None, env={}, overrides={"web_port": 11112})
