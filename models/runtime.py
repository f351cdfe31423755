"""The shipped integer model, served with ONNX Runtime (never torch).

`load_model()` opens models/shipped/ (or another export folder) with one session configuration;
the tests open it twice, with different threads and graph optimisations, and demand identical
integers. On CUDA (onnxruntime-gpu), TF32 is off and cuDNN's convolution algorithm is the
default implicit-GEMM one rather than a benchmarked pick, so the integers stay exact there too.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .entropy import Tables
from .features import SCALE_STEPS, scale_index

SHIPPED = Path(__file__).with_name("shipped")
# Earlier shipped models, one folder per model id: objects stored with them stay decodable
# after an upgrade ships a new model (an archive must never strand what it acknowledged).
RETIRED = Path(__file__).with_name("retired")
# Wavefront steps of fewer pixels than this run single-threaded (see Model.__init__): one
# thread was faster up to 512 pixels on 2 cores, two were faster at 2,560.
NARROW_STEP = 1024
MODEL_FILES = ("full.onnx", "step.onnx", "tables.npz", "weights.npz", "meta.json")


@dataclass(frozen=True)
class SessionConfig:
    threads: int = 0  # 0: ONNX Runtime's default (all cores)
    optimise: bool = True  # all graph optimisations, or none
    cuda: bool | None = None  # None: CUDA when the CUDA execution provider is installed


class Model:
    """One export of the network: its sessions, coding tables, shifts and identifier."""

    def __init__(self, folder: Path = SHIPPED, config: SessionConfig = SessionConfig()):
        import onnxruntime as ort

        missing = [name for name in MODEL_FILES if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"learned codec model incomplete in {folder} (missing {', '.join(missing)}): "
                "reinstall compacs, or run python -m compacs.models.training.export"
            )
        digest = hashlib.sha256()
        for name in MODEL_FILES:
            digest.update((folder / name).read_bytes())
        # The identifier is the content: a bitstream names exactly the model that coded it.
        self.model_id = digest.digest()[:16]
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "tables.npz") as t:
            self.tables = Tables(t["freqs"].astype(np.int32), t["lows"].astype(np.int32))
        self.channels = int(self.meta["channels"])
        self.blocks = int(self.meta["blocks"])
        self.head_shift = int(self.meta["head_shift"])
        self.first_taps = [tuple(t) for t in self.meta["first_taps"]]

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if config.optimise
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        use_cuda = config.cuda
        if use_cuda is None:
            use_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        providers: list = ["CPUExecutionProvider"]
        if use_cuda:
            cuda_options = {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
            providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        self.providers = providers
        self.full = ort.InferenceSession(str(folder / "full.onnx"), options, providers=providers)
        self.step = ort.InferenceSession(str(folder / "step.onnx"), options, providers=providers)
        # A wavefront step is a few hundred pixels through ~110 small nodes: waking a second
        # thread for each node costs more than it saves (0.29 against 0.32 ms for 128 pixels,
        # 0.94 against 1.09 ms for 512), so on a CPU narrow steps run on one thread and only
        # wide ones (a batch of slices) on the configured pool. Spinning threads would help the
        # step but take the core from the numpy half of it (measured: slower overall).
        self.narrow_step = self.step
        if not use_cuda and config.threads != 1:
            options.intra_op_num_threads = 1
            self.narrow_step = ort.InferenceSession(
                str(folder / "step.onnx"), options, providers=providers
            )

    @property
    def name(self) -> str:
        return self.model_id.hex()

    def run_full(self, feats: np.ndarray) -> np.ndarray:
        """Head accumulators (B, 2, H, W) int64 for int features (B, H, W, 4)."""
        x = np.ascontiguousarray(feats.transpose(0, 3, 1, 2), dtype=np.float32)
        return self.full.run(["acc"], {"feats": x})[0].astype(np.int64)

    def run_step(self, feat: np.ndarray, nb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        session = self.narrow_step if len(feat) < NARROW_STEP else self.step
        h, acc = session.run(["h", "acc"], {"feat": feat, "nb": nb})
        return h, acc.astype(np.int64)

    def predictions(
        self,
        acc: np.ndarray,
        med: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        d: np.ndarray,
        base: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale index) from the head accumulators (..., 2) in integer arithmetic."""
        shift = self.head_shift
        delta = (acc[..., 0] * d) >> shift
        level_shift = shift - SCALE_STEPS.bit_length() + 1  # SCALE_STEPS is a power of two
        level = acc[..., 1] >> level_shift if level_shift >= 0 else acc[..., 1] << -level_shift
        return np.minimum(np.maximum(med + delta, lo), hi), scale_index(base, level)


_DEFAULT_THREADS = {"threads": 0}


def set_default_threads(threads: int) -> None:
    """ONNX Runtime threads for the sessions opened from now on without a SessionConfig. A
    compression worker sets 1: the node runs one worker per core, and each worker's sessions
    spreading over every core would only make them compete with each other and with ingest."""
    _DEFAULT_THREADS["threads"] = threads


def load_model(folder: str | None = None, config: SessionConfig | None = None) -> Model:
    """The model in `folder` (default: the shipped one), one instance per configuration."""
    return _load_model(folder, config or SessionConfig(threads=_DEFAULT_THREADS["threads"]))


@functools.cache
def _load_model(folder: str | None, config: SessionConfig) -> Model:
    return Model(Path(folder) if folder else SHIPPED, config)


def model_for(model_id: bytes, current: Model) -> Model | None:
    """The model that made a bitstream: `current`, a retired one with that id, or None."""
    if model_id == current.model_id:
        return current
    folder = RETIRED / model_id.hex()
    if not folder.is_dir():
        return None
    retired = load_model(str(folder))
    if retired.model_id != model_id:  # the folder name is the content hash, so this is damage
        raise ValueError(f"{folder} does not hold model {model_id.hex()}: reinstall compacs")
    return retired
