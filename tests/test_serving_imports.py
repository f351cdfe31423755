"""Serving the learned codec never imports torch: only compacs.models.training may.

Why: the node serves the learned codec with ONNX Runtime, numpy and constriction; torch is a
training dependency of several hundred MB that a deployment need not install, and one stray
import on the serving path would make every node start slower and fail where torch is absent.
The test environment has torch installed (the `test` extra trains in a smoke test), so an
import on the serving path would succeed silently: these tests watch for it.

Two views: a clean interpreter (`python -I`) codes through the codec registry and reports its
`sys.modules`; and a real `compacs serve` process, with its spawned compression workers and the
CLI commands beside it, runs under a meta-path watcher (a `sitecustomize` on PYTHONPATH) that
writes down every attempt to import torch or the training package, with the importing stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dicomdata
import peers
import pydicom
import pytest
from nodecheck import wait_compressed

from compacs.codecs import registry

pytestmark = pytest.mark.skipif(
    not registry.get("learned").is_available(), reason="onnxruntime or the shipped model missing"
)

# Modules whose import means the serving path reached training code.
FORBIDDEN = ("torch", "compacs.models.training")

# Run in `python -I` (no PYTHONPATH, no user site, no current folder on sys.path): the learned
# frame codec lossless and bounded-error, and the learned volume codec, each through the
# registry as the node calls them, on pydicom's 10-frame MR; then what got imported.
CODE_THROUGH_REGISTRY = """
import json, sys
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.pixels import iter_pixels
from compacs.codecs import registry
from compacs.codecs.base import PixelFormat

ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
fmt = PixelFormat.from_dataset(ds)
frames = list(iter_pixels(ds, raw=True))
learned = registry.get("learned")
for delta in (0, 2):
    data = learned.encode_frame(frames[0], fmt, delta=delta)
    error = np.abs(learned.decode_frame(data, fmt).astype(np.int64) - frames[0])
    assert error.max() <= delta, (delta, error.max())
volume = registry.get_volume("learnvol")
back = volume.decode_frames(volume.encode_volume(frames[:3], fmt), fmt)
assert all(np.array_equal(a, b) for a, b in zip(back, frames[:3], strict=True))
print(json.dumps(sorted(sys.modules)))
"""

# Installed as sitecustomize.py on PYTHONPATH: every Python process started with that
# environment (the node, its spawned workers, CLI commands) records that it was watched and
# any import of a FORBIDDEN module, with the stack that asked for it. It lets the import
# proceed: the record, not a failure the caller might catch, is what the test reads.
IMPORT_WATCH = """
import os
import sys
import traceback

_LOG = os.environ["IMPORT_WATCH_LOG"]
_FORBIDDEN = {forbidden!r}


class _Watch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in _FORBIDDEN:
            with open(_LOG, "a") as log:
                stack = "".join(traceback.format_stack())
                log.write(f"pid {{os.getpid()}} imports {{name}}:\\n{{stack}}\\n")
        return None


sys.meta_path.insert(0, _Watch)
with open(_LOG + ".watched", "a") as watched:
    watched.write(f"{{os.getpid()}}\\n")
"""

LEARNED_MR = """
[[rules]]
name = "mr-learned"
match = { Modality = "MR" }
codecs = ["learned"]

[[rules]]
name = "everything-else"
match = {}
codecs = ["passthrough"]
"""


def forbidden_in(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_learned_coding_through_the_registry_imports_no_torch() -> None:
    """A clean interpreter codes frames and a volume with the learned codecs: no torch loaded."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", CODE_THROUGH_REGISTRY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout)
    # The serving side really ran: the runtime, both decoders and ONNX Runtime were imported.
    for needed in ("compacs.models.runtime", "compacs.models.wavefront", "onnxruntime"):
        assert needed in modules
    assert "compacs.models.interslice" in modules
    assert forbidden_in(modules) == []


def watched_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that installs the import watch in every Python process it starts."""
    site = tmp_path / "watch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(IMPORT_WATCH.format(forbidden=set(FORBIDDEN)))
    log = tmp_path / "imports.log"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "IMPORT_WATCH_LOG": str(log)}, log


def test_the_watch_sees_a_torch_import(tmp_path: Path) -> None:
    """The watch the node test relies on records an import of the training package."""
    env, log = watched_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", "import compacs.models.training.network"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = log.read_text()
    assert "imports compacs.models.training" in recorded and "imports torch" in recorded


def test_a_serving_node_imports_no_torch(make_node, tmp_path: Path) -> None:
    """`compacs serve` answers C-ECHO, stores an MR with the learned codec in its workers and
    decodes it for a C-GET: no process of it imports torch or the training package."""
    env, log = watched_env(tmp_path)
    node = make_node(LEARNED_MR, env=env)
    assert node.echo().returncode == 0
    mr = dicomdata.fresh_copy("MR_small.dcm", tmp_path / "in")
    assert peers.store_ok(node.store([mr]), [mr])
    stats = wait_compressed(node, 1)
    assert stats["by_codec"]["learned"]["instances"] == 1
    out = tmp_path / "get"
    sop = pydicom.dcmread(mr)
    res = peers.getscu(node.port, "STUDY", {"StudyInstanceUID": sop.StudyInstanceUID}, out)
    assert "Received C-GET Response (Success)" in res.stdout, res.stdout[-2000:]
    (got,) = out.iterdir()
    assert (pydicom.dcmread(got).pixel_array == sop.pixel_array).all()

    watched = Path(f"{log}.watched").read_text().split()
    assert str(node.pid) in watched, "the node ran without the import watch"
    assert not log.exists(), log.read_text()
