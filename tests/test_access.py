"""[access]: which calling AE titles (and hosts) may store, query and retrieve."""

from __future__ import annotations

from pathlib import Path

import dicomdata
import peers

CONFIG = """
[access]
store = ["MODALITY"]
query = ["VIEWER@127.0.0.1"]
retrieve = ["VIEWER@10.9.9.9"]
"""


def test_default_allows_anyone_and_says_so(compacs_node) -> None:
    assert (
        "access: store: any caller; query: any caller; retrieve: any caller"
        in compacs_node.log_text()
    )


def test_unknown_caller_is_rejected_at_association(make_node, tmp_path: Path) -> None:
    node = make_node(CONFIG)
    files = dicomdata.ct_series(tmp_path / "ct", 1)
    res = node.store(files, aet="INTRUDER")
    assert not peers.store_ok(res, files)
    assert "Association Rejected" in res.stdout
    assert "association rejected: calling AE INTRUDER" in node.log_text()
    assert peers.store_ok(node.store(files, aet="MODALITY"), files)


def test_caller_gets_only_its_services(make_node, tmp_path: Path) -> None:
    node = make_node(CONFIG)
    files = dicomdata.ct_series(tmp_path / "ct", 1)
    # VIEWER may query (from this host) but not store, nor retrieve (other host only)
    res = node.store(files, aet="VIEWER")
    assert "Store Response (Unknown Status: 0x124)" in res.stdout, res.stdout[-2000:]  # refused
    assert peers.store_ok(node.store(files, aet="MODALITY"), files)
    res = peers.findscu(node.port, "STUDY", {"StudyInstanceUID": ""}, aet="VIEWER")
    assert res.returncode == 0 and "Received Final Find Response (Success)" in res.stdout
    res = peers.findscu(node.port, "STUDY", {"StudyInstanceUID": ""}, aet="MODALITY")
    assert (
        "Final Find Response" in res.stdout
        and "Success" not in res.stdout.split("Final Find Response")[-1].splitlines()[0]
    )
    res = peers.getscu(
        node.port, "STUDY", {"StudyInstanceUID": "1.2.3"}, tmp_path / "g", aet="VIEWER"
    )
    assert "Success" not in res.stdout.split("Final Get Response")[-1].splitlines()[0]
    log = node.log_text()
    assert "refused store for VIEWER" in log and "refused query for MODALITY" in log
    assert "refused retrieve for VIEWER" in log
