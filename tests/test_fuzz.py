"""Mutated real DICOM files against a running node: never a crash, a hang or a half-stored
object; every C-STORE gets a DICOM status.

Seeds are the tests' real files (dicomdata.SAMPLE_SOURCES, fresh UIDs for every example);
hypothesis mutates the data set's bytes (flipped bits, bytes set, runs inserted or cut,
lengths of 0xFFFFFFFF, truncation), half of the time within the first KiB where the
elements the node parses first live. Three doors in:

- a raw pynetdicom SCU that sends the mutated bytes as they are (pynetdicom's chunked file
  sending: no pydicom round trip that would repair or refuse them first);
- DCMTK storescu, which parses each file itself and sends what it can read;
- ``compacs send``, compacs' own reading of files off a disk (there is no separate import
  path: files enter the archive over the network).

CI runs a fixed seed (``derandomize``) and a bounded number of examples; COMPACS_LOAD_SCALE
multiplies the count for the longer run docs/robustness.md reports.
"""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import dicomdata
import peers
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loadscale import scaled
from nodecheck import wait_compressed
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.status import code_to_category

# Small real files of every encoding the node takes (big ones would only slow the run).
SEEDS = ("ct", "mr", "multiframe", "rgb", "jpeg_ls", "rle", "jpeg_lossless", "implicit",
         "signed12", "deflate", "j2k")  # fmt: skip
# storescu sends these without a compressed proposal
UNCOMPRESSED_SEEDS = ("ct", "mr", "multiframe", "rgb", "implicit", "signed12")

KINDS = ("flip", "set", "insert", "delete", "truncate", "huge_length")
mutations = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.one_of(st.integers(0, 1023), st.integers(0, 1 << 22)),  # the header, or anywhere
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)
FUZZ_SETTINGS = settings(
    derandomize=True,  # a fixed seed: CI runs the same examples every time
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def mutate(data: bytes, start: int, ops: list[tuple[str, int, int]]) -> bytes:
    """``data`` with the bytes from ``start`` on (the data set after the file meta) changed
    by ``ops``: (kind, position, value), positions wrapped into what is left."""
    body = bytearray(data[start:])
    for kind, pos, value in ops:
        if not body:
            break
        i = pos % len(body)
        if kind == "flip":
            body[i] ^= 1 << (value % 8)
        elif kind == "set":
            body[i] = value
        elif kind == "insert":
            body[i:i] = bytes([value]) * (1 + value % 16)
        elif kind == "delete":
            del body[i : i + 1 + value % 16]
        elif kind == "truncate":
            del body[i:]
        elif kind == "huge_length":  # where a 32-bit length is, it now claims 4 GiB
            body[i : i + 4] = b"\xff\xff\xff\xff"
    return data[:start] + bytes(body)


class Seeds:
    """The seed files, each re-written with a fresh SOP Instance UID for every example (the
    node keeps the first of a UID it has seen: a repeat would hide what a mutation did)."""

    def __init__(self, folder: Path, keys: tuple[str, ...]) -> None:
        files = dicomdata.sample_files(folder / "seeds", list(keys))
        self.datasets = {key: pydicom.dcmread(path) for key, path in files.items()}
        self.out = folder / "mutated"
        self.out.mkdir()
        self.count = itertools.count()

    def write(self, key: str, ops: list[tuple[str, int, int]]) -> tuple[Path, str]:
        """A mutated copy of seed ``key``: its path and the SOP Instance UID in its meta."""
        ds = self.datasets[key]
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        path = self.out / f"{next(self.count):05d}_{key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _meta, start = split_dataset(path)  # the file meta stays intact, as a sender's would
        path.write_bytes(mutate(path.read_bytes(), start, ops))
        return path, sop


class Ledger:
    """What the node answered, to compare with what it holds once the run is over."""

    def __init__(self) -> None:
        self.stored: set[str] = set()  # Success or Warning: must be in the archive, whole
        self.refused: set[str] = set()  # a Failure status: must not be
        self.statuses: dict[int, int] = {}

    def answered(self, sop: str, status: int) -> None:
        category = code_to_category(status)
        assert category in ("Success", "Warning", "Failure"), f"0x{status:04X} is no status"
        (self.stored if category in ("Success", "Warning") else self.refused).add(sop)
        self.statuses[status] = self.statuses.get(status, 0) + 1


def check_archive(node: peers.CompacsProcess, ledger: Ledger) -> None:
    """The node is alive, answers, and holds exactly what it acknowledged, each object
    readable to its end (verify checks checksums and decodes; no half-written blob)."""
    assert node.running, node.log_tail()
    assert node.echo().returncode == 0
    stats = wait_compressed(node, len(ledger.stored), timeout=300)
    assert stats["instances"] == len(ledger.stored), (stats, ledger.statuses)
    out = node.data_dir.parent / "exported"
    res = node.export(out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    held = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
        for p in out.rglob("*.dcm")
    }
    assert held == ledger.stored, (held ^ ledger.stored, ledger.statuses)
    verify = node.verify()
    assert "checksum mismatch" not in verify.stdout and "orphan" not in verify.stdout, verify.stdout
    assert "Traceback" not in node.log_text()


def test_mutated_files_over_a_raw_scu_always_get_a_status(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    seeds = Seeds(tmp_path, SEEDS)
    ae = AE(ae_title="FUZZSCU")
    for ds in seeds.datasets.values():
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ledger = Ledger()
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the mutated bytes, as they are

    @settings(FUZZ_SETTINGS, max_examples=scaled(40))
    @given(key=st.sampled_from(SEEDS), ops=mutations)
    def send_one(key: str, ops: list[tuple[str, int, int]]) -> None:
        path, sop = seeds.write(key, ops)
        assoc = ae.associate(compacs_node.host, compacs_node.port, ae_title=compacs_node.ae_title)
        assert assoc.is_established, compacs_node.log_tail()
        try:
            status = assoc.send_c_store(path)
            assert status, f"{path}: no status (association {assoc.is_aborted and 'aborted'})"
            ledger.answered(sop, status.Status)
        finally:
            assoc.release()

    try:
        send_one()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
    print("statuses:", {f"0x{k:04X}": v for k, v in sorted(ledger.statuses.items())})
    assert ledger.refused and ledger.stored, ledger.statuses  # the mutations did bite
    check_archive(compacs_node, ledger)


def storescu_log(node: peers.CompacsProcess, path: Path) -> str:
    """storescu's verbose log of sending one file: decoded leniently, since storescu's
    warnings quote the mutated file's bytes (peers.storescu decodes strictly)."""
    args = ["storescu", "-v", "-R", "-aet", "STORESCU", "-aec", node.ae_title]
    res = subprocess.run(
        [*args, node.host, str(node.port), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=peers.dcmtk_env(),
        timeout=120,
    )
    return res.stdout.decode(errors="replace")


def test_mutated_files_through_storescu_always_get_a_status(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    seeds = Seeds(tmp_path, UNCOMPRESSED_SEEDS)
    ledger = Ledger()
    sent_any = []

    @settings(FUZZ_SETTINGS, max_examples=scaled(15))
    @given(key=st.sampled_from(UNCOMPRESSED_SEEDS), ops=mutations)
    def send_one(key: str, ops: list[tuple[str, int, int]]) -> None:
        path, sop = seeds.write(key, ops)
        outcome = peers.parse_storescu_log(storescu_log(compacs_node, path)).get(str(path))
        if outcome is None or outcome.startswith("Failed"):
            return  # storescu could not read or send it: the node saw nothing of it
        if outcome == "Success" or outcome.startswith("Warning"):
            ledger.stored.add(sop)
        else:  # "Failed: ..." from the node's status, e.g. "Error: Cannot understand"
            ledger.refused.add(sop)
        sent_any.append(outcome)

    send_one()
    assert sent_any, "storescu sent none of the mutated files"
    check_archive(compacs_node, ledger)


def test_mutated_files_through_compacs_send_never_crash_it(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    """compacs' own reader of files: a folder of mutated files is sent as far as each can
    be; the ones it cannot are named with a reason, never a traceback."""
    seeds = Seeds(tmp_path, SEEDS)
    data = st.tuples(st.sampled_from(SEEDS), mutations)

    @settings(FUZZ_SETTINGS, max_examples=1)
    @given(batch=st.lists(data, min_size=scaled(20), max_size=scaled(20)))
    def write_batch(batch: list[tuple[str, list[tuple[str, int, int]]]]) -> None:
        for key, ops in batch:
            seeds.write(key, ops)

    write_batch()
    files = sorted(seeds.out.iterdir())
    target = f"{compacs_node.ae_title}@{compacs_node.host}:{compacs_node.port}"
    res = compacs_node.cli("send", "--to", target, str(seeds.out), timeout=600)
    assert res.returncode in (0, 1), res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.startswith("sent "), res.stdout[-2000:]
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED ")]
    assert all(": " in line[len("FAILED ") :] for line in failed)  # each with its reason
    sent = int(summary.split()[1])
    assert sent + len(failed) <= len(files)
    stats = wait_compressed(compacs_node, sent, timeout=300)
    assert stats["instances"] == sent, (stats, res.stdout[-2000:])  # acknowledged = held
    assert compacs_node.running and compacs_node.echo().returncode == 0
    verify = compacs_node.verify()
    assert "checksum mismatch" not in verify.stdout and "orphan" not in verify.stdout
    assert "Traceback" not in compacs_node.log_text()


def test_a_value_whose_length_does_not_fit_its_vr_gets_a_status_not_a_traceback(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    """What the long fuzz run found: Columns (US) one byte long. pydicom reads values only
    when asked, so the index's read of Columns raised after the checks had passed: 0x0110 and
    a traceback in the log. The shrunk case, kept so that CI sees it every time."""
    seeds = Seeds(tmp_path, ("ct",))
    path, sop = seeds.write("ct", [])
    data = bytearray(path.read_bytes())
    at = data.index(b"\x28\x00\x11\x00US\x02\x00")  # (0028,0011) US, length 2
    data[at + 6 : at + 11] = b"\x01\x00" + data[at + 8 : at + 9]  # length 1, one byte
    path.write_bytes(bytes(data))
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="FUZZSCU")
        ds = seeds.datasets["ct"]
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(compacs_node.host, compacs_node.port, ae_title=compacs_node.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
    assert status and status.Status != 0x0110, status
    ledger = Ledger()
    ledger.answered(sop, status.Status)
    check_archive(compacs_node, ledger)
