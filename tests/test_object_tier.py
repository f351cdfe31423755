"""A tier whose root is an S3-compatible bucket, against moto's standalone server as a real
HTTP process on loopback: a move to the bucket retrieved bit-exact through the node, fixity
finding an overwritten and a missing object, a kill -9 in the middle of a move, one frame of
a series volume read with ranged GETs (counted by a recording proxy in front of moto), and
the config's checks of a bucket root."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, store_all, wait_compressed
from sqlalchemy import update
from test_tiering import Inline, assert_read_back, frames_by_sop, later, receive

from compacs.service.archive_service import ArchiveService
from compacs.service.compress import source_frames
from compacs.service.config import ConfigError, load_config
from compacs.service.jobs import Jobs
from compacs.service.storage.archive import Archive
from compacs.service.storage.index import Blob, Index

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
AS_OF = "2099-01-01"  # everything is due


@dataclass
class MotoServer:
    endpoint: str
    port: int


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 as its own process on a free loopback port, stopped by its PID."""
    port = peers.free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60  # a deadline, not a measure
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield MotoServer(f"http://127.0.0.1:{port}", port)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def s3_client(endpoint: str):  # noqa: ANN201
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    name = f"compacs-{uuid.uuid4().hex[:12]}"
    s3_client(moto_server.endpoint).create_bucket(Bucket=name)
    return name


def tier_toml(endpoint: str, bucket: str, codecs: str, form: str, choose: str = "first") -> str:
    return f"""
[[tiers]]
name = "cold"
root = "s3://{bucket}/archive"
after_days = 30
codecs = {codecs}
form = "{form}"
choose = "{choose}"
[tiers.s3]
endpoint_url = "{endpoint}"
region = "us-east-1"
access_key_id = "testing"
secret_access_key = "testing"
"""


def bucket_keys(endpoint: str, bucket: str) -> set[str]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix="archive/")
    return {item["Key"].removeprefix("archive/") for item in listed.get("Contents", [])}


def open_service(tmp_path: Path, tiers: str) -> ArchiveService:
    """The real archive service in-process (SQLite index, hot folder, the bucket tier), its
    jobs and moves run in the calling thread."""
    cfg = tmp_path / "compacs.toml"
    cfg.write_text("[tiering]\nstable_minutes = 0\ncpu_share = 1\n" + tiers)
    config = load_config(cfg, env={}, overrides={"data_dir": str(tmp_path / "data")})
    config.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index.open(config.effective_index_url, create=True)
    archive = Archive(config.data_dir / "archive")
    return ArchiveService(config, archive, index, Jobs(config, archive, index, "t:1", Inline))


@pytest.fixture
def services() -> Iterator[list[ArchiveService]]:
    opened: list[ArchiveService] = []
    yield opened
    for service in opened:
        service.close()


class Recorder(ThreadingHTTPServer):
    """A loopback HTTP proxy in front of moto that records each request: method, path,
    Range header, status and the body bytes it served."""

    def __init__(self, upstream: int) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        self.log: list[tuple[str, str, str | None, int, int]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.server.log.append(
            (self.command, self.path, self.headers.get("Range"), resp.status, len(data))
        )
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        size = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", size or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return None


@pytest.fixture
def recorder(moto_server: MotoServer) -> Iterator[Recorder]:
    proxy = Recorder(moto_server.port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_one_frame_of_a_series_volume_in_the_bucket_is_read_with_ranged_gets(
    tmp_path, services, bucket, recorder
) -> None:
    codecs = '[{ codec = "hevc", params = { gop_size = 4 } }]'
    service = open_service(tmp_path, tier_toml(recorder.endpoint, bucket, codecs, "volume"))
    services.append(service)
    ct = dicomdata.real_ct_series(tmp_path / "ct")
    receive(service, ct)
    report = service.tier_run(later(), executor=Inline())
    assert not report.failed and report.series_packed == 1 and report.moved == len(ct)
    held = {inst.sop_instance_uid: inst for inst in service.index.instances()}
    middle = pydicom.dcmread(ct[10])
    inst = held[str(middle.SOPInstanceUID)]
    assert inst.blob.tier == "cold" and inst.blob.kind == "volume"
    key = f"/{bucket}/archive/{inst.blob.path}"
    assert [m for m, path, *_ in recorder.log if path.split("?")[0] == key] == ["PUT", "HEAD"]
    size = s3_client(recorder.endpoint).head_object(Bucket=bucket, Key=f"archive/{inst.blob.path}")[
        "ContentLength"
    ]

    recorder.log.clear()
    service.volumes = type(service.volumes)()  # nothing decoded yet
    got = pydicom.dcmread(BytesIO(service.read_instance(inst)))
    assert np.array_equal(source_frames(got)[0], source_frames(middle)[0])
    gets = [entry for entry in recorder.log if entry[1].split("?")[0] == key]
    assert gets and all(m == "GET" and rng and status == 206 for m, _p, rng, status, _n in gets)
    served = sum(n for *_rest, n in gets)
    assert served < size / 2, (served, size, gets)  # one group of 4 frames of 20, and headers
    assert_read_back(service, frames_by_sop(ct))  # and every other slice, bit-exact


def test_fixity_finds_an_overwritten_and_a_missing_object(
    tmp_path, services, moto_server, bucket
) -> None:
    import dataclasses

    tiers = tier_toml(moto_server.endpoint, bucket, '["jpegxl"]', "instance")
    service = open_service(tmp_path, tiers)
    services.append(service)
    files = dicomdata.real_ct_series(tmp_path / "ct")[:3]
    receive(service, files)
    assert service.tier_run(later(), executor=Inline()).moved == 3
    service.config.storage = dataclasses.replace(service.config.storage, delete_grace_seconds=0)
    service.sweep()  # the hot copies, released by the switch
    assert not set(service.archive.blobs())
    assert bucket_keys(moto_server.endpoint, bucket) == service.index.blob_paths()
    assert_read_back(service, frames_by_sop(files))
    report = service.fixity_run()
    assert report.checked == 3 and not report.failed

    first, second, _third = sorted(service.index.blob_paths())
    client = s3_client(moto_server.endpoint)
    body = bytearray(client.get_object(Bucket=bucket, Key=f"archive/{first}")["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=f"archive/{first}", Body=bytes(body))
    client.delete_object(Bucket=bucket, Key=f"archive/{second}")
    with service.index.writing() as s:  # due again
        s.execute(update(Blob).values(verified_at=None))
    report = service.fixity_run()
    assert report.checked == 3 and len(report.failed) == 2, report.failed
    failed = dict(line.split(": ", 1) for line in report.failed)
    assert "checksum mismatch" in failed[f"cold/{first}"]
    assert "no such object" in failed[f"cold/{second}"]
    assert {path for _t, path, _e in service.index.fixity_failures()} == {first, second}


def test_a_bucket_root_is_checked_with_messages_naming_the_file_and_key(tmp_path) -> None:
    cfg = tmp_path / "compacs.toml"
    tier = '[[tiers]]\nname = "cold"\ncodecs = ["jpegxl"]\n'
    cases = {
        'root = "s3://Bad_Bucket/x"\n': "root = 's3://Bad_Bucket/x': the bucket name",
        'root = "s3://cold-bucket/a//b"\n': "the prefix after the bucket",
        'root = "/srv/cold"\ns3 = { region = "eu-west-1" }\n': "s3: only for a bucket root",
        'root = "s3://cold-bucket"\ns3 = { endpoint_url = "minio:9000" }\n': (
            "s3.endpoint_url = 'minio:9000': an http:// or https:// URL"
        ),
        'root = "s3://cold-bucket"\ns3 = { access_key_id = "AK" }\n': (
            "access_key_id and secret_access_key go together"
        ),
        'root = "s3://cold-bucket"\ns3 = { secret = "x" }\n': "s3: unknown key(s) secret",
    }
    for lines, message in cases.items():
        cfg.write_text(tier + lines)
        with pytest.raises(ConfigError) as caught:
            load_config(cfg, env={}, overrides={"data_dir": str(tmp_path / "data")})
        assert str(caught.value).startswith(f"{cfg}: tier 'cold' (tiers[0]) "), caught.value
        assert message in str(caught.value)
    cfg.write_text(tier + 'root = "s3://cold-bucket/node1/"\n')
    (parsed,) = load_config(cfg, env={}, overrides={"data_dir": str(tmp_path)}).tiers
    assert parsed.store.root == "s3://cold-bucket/node1" and parsed.store.is_bucket


NODE_TIERING = """
[ingest]
lease_seconds = 2
[tiering]
stable_minutes = 0
cpu_share = 1
every_minutes = 0
"""


def tier_run(node: peers.CompacsProcess) -> subprocess.CompletedProcess[str]:
    return node.cli(
        "tier", "run", "--config", str(node.config), "--data", str(node.data_dir), "--as-of", AS_OF
    )


def test_a_move_to_the_bucket_is_retrieved_bit_exact_through_the_node(
    make_node, tmp_path, moto_server, bucket
) -> None:
    tiers = tier_toml(moto_server.endpoint, bucket, '["jpegxl", "hevc"]', "volume", "smallest")
    node = make_node(NODE_TIERING + tiers)
    ct = dicomdata.real_ct_series(tmp_path / "ct")
    cine = dicomdata.real_us_cine(tmp_path / "us", frames=12)
    store_all(node, [*ct, cine])
    wait_compressed(node, len(ct) + 1)
    res = tier_run(node)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(ct) + 1} instance(s) moved" in res.stdout
    assert node.stats()["by_tier"]["cold"]["instances"] == len(ct) + 1
    assert bucket_keys(moto_server.endpoint, bucket)  # the blobs are in the bucket

    out = tmp_path / "get"
    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": study}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    for path in ct:
        src = pydicom.dcmread(path)
        assert np.array_equal(pydicom.dcmread(got[src.SOPInstanceUID]).pixel_array, src.pixel_array)
    out = tmp_path / "get-us"
    src = pydicom.dcmread(cine)
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": src.StudyInstanceUID}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    (copy,) = out.iterdir()
    assert np.array_equal(dicomdata.read_pixels(copy), src.pixel_array)


def test_kill_9_during_a_move_to_the_bucket_loses_nothing(
    make_node, tmp_path, moto_server, bucket
) -> None:
    tiers = tier_toml(moto_server.endpoint, bucket, '["jpegxl"]', "instance")
    node = make_node(NODE_TIERING + tiers)
    files = [*dicomdata.real_ct_series(tmp_path / "ct"), *dicomdata.real_mr_series(tmp_path / "mr")]
    store_all(node, files)
    wait_compressed(node, len(files))
    conf = ["--config", str(node.config), "--data", str(node.data_dir)]
    runner = subprocess.Popen(
        [sys.executable, "-m", "compacs.service.cli", "tier", "run", *conf, "--as-of", AS_OF],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its worker too, killed with it
        env={k: v for k, v in os.environ.items() if not k.startswith("COMPACS_")},
    )
    deadline = time.monotonic() + 120  # a deadline, not a measure
    while (
        not bucket_keys(moto_server.endpoint, bucket)
        and runner.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.killpg(runner.pid, signal.SIGKILL)  # mid-run: an object put, others not
    runner.wait()
    midway = node.stats()["by_tier"]
    assert midway.get("hot", {}).get("instances", 0) > 0, midway  # it was killed mid-run
    time.sleep(2.5)  # past the lease: what it claimed and put counts as a dead writer's

    res = tier_run(node)  # removes the killed run's orphan objects, finishes the rest
    assert res.returncode == 0, res.stdout + res.stderr
    stats = node.stats()
    assert stats["by_tier"]["cold"]["instances"] == len(files) and stats["pending"] == 0
    out = tmp_path / "out"
    res = node.cli("export", *conf, "--all", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:]
    exported = exported_by_sop(out)
    for path in files:
        src = pydicom.dcmread(path)
        assert np.array_equal(
            pydicom.dcmread(exported[src.SOPInstanceUID]).pixel_array, src.pixel_array
        )
    verify = node.cli("verify", *conf)  # no orphan object in the bucket, every blob intact
    assert verify.returncode == 0, verify.stdout[-3000:]
