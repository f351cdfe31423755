"""The learned codec on the node: named by a rule like any codec, lossless or bounded-error.

A bounded-error result is lossy in DICOM's sense (invariant 3): a new SOP Instance UID
derived from the received one, Lossy Image Compression 01 with ratio and method, Image Type
DERIVED, the original in the Source Image Sequence, and the bound and measured error in the
index. It happens only where a rule names the codec with a delta; retrieval transcodes it
(the private syntax never leaves the node) and keeps the lossy attributes.
"""

from __future__ import annotations

from pathlib import Path

import dicomdata
import numpy as np
import peers
import pydicom
import pytest
from nodecheck import exported_by_sop, wait_compressed
from sqlalchemy import create_engine, text

from compacs.codecs import registry

pytestmark = pytest.mark.skipif(
    not registry.get("learned").is_available(), reason="onnxruntime or the shipped model missing"
)

LEARNED_CT = """
[[rules]]
name = "ct-near-lossless"
match = { Modality = "CT" }
codecs = [{ codec = "learned", params = { delta = 2 } }, "jpegls"]

[[rules]]
name = "mr-learned-lossless"
match = { Modality = "MR" }
codecs = ["learned"]

[[rules]]
name = "everything-else"
match = {}
codecs = ["passthrough"]
"""


def index_rows(node: peers.CompacsProcess) -> list[dict]:
    engine = create_engine(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT sop_instance_uid, derived_from, lossy_bound, max_error, codec,"
                " stored_transfer_syntax FROM instance"
            )
        ).mappings()
        result = [dict(r) for r in rows]
    engine.dispose()
    return result


def test_a_rule_with_delta_stores_a_derived_lossy_instance(make_node, tmp_path: Path) -> None:
    node = make_node(LEARNED_CT)
    ct = dicomdata.signed_ct_12bit(tmp_path / "in")  # real CT, signed 12-bit
    mr = dicomdata.fresh_copy("MR_small.dcm", tmp_path / "in")
    for f in (ct, mr):
        assert peers.store_ok(node.store([f]), [f])
    wait_compressed(node, 2)
    source = pydicom.dcmread(ct)
    rows = {r["derived_from"] or r["sop_instance_uid"]: r for r in index_rows(node)}
    lossy = rows[source.SOPInstanceUID]
    assert lossy["codec"] == "learned" and lossy["lossy_bound"] == 2
    assert lossy["sop_instance_uid"] != source.SOPInstanceUID
    assert 0 < lossy["max_error"] <= 2
    lossless = rows[pydicom.dcmread(mr).SOPInstanceUID]
    assert lossless["codec"] == "learned" and lossless["derived_from"] is None
    log = node.log_text()
    assert "stored LOSSILY as derived SOP" in log

    out = tmp_path / "get"
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": source.StudyInstanceUID}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    (got_path,) = out.iterdir()
    got = pydicom.dcmread(got_path)
    assert got.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    assert got.SOPInstanceUID == lossy["sop_instance_uid"]
    assert got.LossyImageCompression == "01" and list(got.ImageType)[0] == "DERIVED"
    assert "COMPACS_NEAR" in list(np.atleast_1d(got.LossyImageCompressionMethod))
    assert got.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    error = np.abs(got.pixel_array.astype(np.int64) - dicomdata.signed_ct_12bit_values())
    assert error.max() <= 2

    exported = tmp_path / "export"
    assert node.export(exported).returncode == 0
    mr_out = exported_by_sop(exported)[pydicom.dcmread(mr).SOPInstanceUID]
    assert np.array_equal(pydicom.dcmread(mr_out).pixel_array, pydicom.dcmread(mr).pixel_array)

    # the original re-sent: recognised through derived_from, not stored a second time
    assert peers.store_ok(node.store([ct]), [ct])
    assert wait_compressed(node, 2)["instances"] == 2
    assert "already stored, same data set" in node.log_text()


def test_the_learned_codec_never_runs_without_a_rule_naming_it(compacs_node, tmp_path) -> None:
    ct = dicomdata.signed_ct_12bit(tmp_path / "in")
    assert peers.store_ok(compacs_node.store([ct]), [ct])
    stats = wait_compressed(compacs_node, 1)
    assert "learned" not in stats["by_codec"] and stats["by_codec"]["jpegls"]["instances"] == 1
    (row,) = index_rows(compacs_node)
    assert row["derived_from"] is None and row["lossy_bound"] is None
