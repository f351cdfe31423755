"""Invariant 4: a C-GET/C-MOVE sub-operation goes out in a syntax the peer accepted and that
the node can produce, for every received/stored pair the node holds.

The objects are real files in every syntax the node accepts, compressed as the default rules
do; each peer accepts one storage syntax plus explicit VR little endian, in that order of
preference, as C-GET requestors propose them.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import wait_compressed
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from compacs.service.compress import compress, source_frames
from compacs.service.config import load_config
from compacs.service.retrieve import choose_syntax
from compacs.service.rules import object_attributes, select
from compacs.service.storage.index import Instance
from compacs.service.syntaxes import STORAGE_ACCEPTED
from compacs.service.transcode import transcode_dataset

EXPLICIT_LE = str(ExplicitVRLittleEndian)
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def _stored(path: Path) -> tuple[pydicom.Dataset, bytes, str]:
    """The source data set, the bytes the default rules store, and their syntax."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(BytesIO(raw))
    rule = select(load_config(None).rules, object_attributes(ds))
    outcome = compress(raw, ds, rule.codecs if rule else ())
    return pydicom.dcmread(BytesIO(raw)), outcome.data, outcome.transfer_syntax


@pytest.mark.parametrize("key", sorted(dicomdata.SAMPLE_SOURCES))
def test_every_accepted_pair_is_producible_and_pixel_exact(samples, key: str) -> None:
    source, stored, stored_ts = _stored(samples[key])
    inst = Instance(
        received_transfer_syntax=str(source.file_meta.TransferSyntaxUID),
        stored_transfer_syntax=stored_ts,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [np.asarray(f) for f in source_frames(source)]
    for offered in STORAGE_ACCEPTED:
        target = choose_syntax(inst, [offered, EXPLICIT_LE])
        assert target in (offered, EXPLICIT_LE), (key, offered, target)
        if target == stored_ts:
            continue  # the stored bytes pass through
        out = transcode_dataset(pydicom.dcmread(BytesIO(stored)), target)
        assert str(out.file_meta.TransferSyntaxUID) == target
        got = source_frames(pydicom.dcmread(BytesIO(_written(out))))
        if str(source.file_meta.TransferSyntaxUID) in ("1.2.840.10008.1.2.4.50",):
            continue  # a lossy arrival: decoded, never compared with another decoder's
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w), (key, offered, target)


def _written(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_jpeg_lossless_arrival_goes_out_in_explicit_le_not_70(
    compacs_node: peers.CompacsProcess, samples, tmp_path: Path
) -> None:
    """Received as JPEG Lossless SV1 (.4.70), stored as JPEG-LS; a peer accepting [.4.70,
    explicit VR LE] gets explicit VR LE: no encoder makes .4.70."""
    src = samples["jpeg_lossless"]
    assert str(pydicom.dcmread(src).file_meta.TransferSyntaxUID) == JPEG_LOSSLESS_SV1
    res = compacs_node.store([src])
    assert peers.store_ok(res, [src]), res.stdout[-2000:]
    wait_compressed(compacs_node, 1)
    source = pydicom.dcmread(src)
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(source.SOPClassUID, [JPEG_LOSSLESS_SV1, EXPLICIT_LE])
    assoc = ae.associate(
        compacs_node.host,
        compacs_node.port,
        ae_title=compacs_node.ae_title,
        ext_neg=[build_role(source.SOPClassUID, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = source.StudyInstanceUID
        statuses = [
            s.Status
            for s, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            if s
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    (got,) = received
    assert str(got.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    assert np.array_equal(got.pixel_array, source.pixel_array)
