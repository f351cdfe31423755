"""Export the trained network as the shipped integer model:
`python -m compacs.models.training.export`.

Writes into models/shipped/ (or --out):
- `full.onnx`: the whole-image network (Conv layers), used by the δ = 0 encoder;
- `step.onnx`: the same network for the pixels of one wavefront step (MatMul over gathered
  neighbourhoods), used by the decoder and the δ > 0 encoder (models/wavefront.py);
- `tables.npz`: the integer coding tables (models/entropy.py);
- `weights.npz`: the integer weights, biases and shifts the graphs were built from, so that the
  tests can check the accumulator bound and recompute the network in int64 without `onnx`;
- `meta.json`: shapes, shifts, the accumulator bound of every layer, and the training summary.

Both graphs compute the same integers: int8 weights and integer biases (stored as int8/int32
and cast to float32), each accumulator bounded below 2^24 (checked here, and again by the tests
on the shipped files), requantisation by ×2^-s then Floor, then Clip to 0..127. So float32
arithmetic computes them exactly in any summation order, on any CPU or GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..entropy import build_tables
from ..features import FEATURE_SHIFT, N_FEATURES
from ..runtime import SHIPPED
from .network import ACT_SHIFT, CausalNet

OPSET = 17
ACCUMULATOR_LIMIT = 1 << 24
# Tap order of the gathered neighbourhoods in step.onnx; models/wavefront.py gathers in it.
FIRST_TAPS = [(dy, dx) for dy in range(3) for dx in range(7)] + [(3, 0), (3, 1), (3, 2)]
BLOCK_TAPS = [(0, 0), (0, 1), (0, 2), (1, 0)]  # NW, N, NE, W; the centre is computed in-graph


@dataclass
class IntLayer:
    weight: np.ndarray  # int8 (cout, cin, k, k), masked
    bias: np.ndarray  # int32 (cout,)
    shift: int  # requantisation: floor(acc * 2^-shift); for the head: e + ACT_SHIFT

    def bound(self, max_input: int = 127) -> int:
        """Largest |accumulator| any input in ±max_input can give: must stay below 2^24."""
        w = np.abs(self.weight.astype(np.int64)).reshape(len(self.weight), -1).sum(axis=1)
        return int((w * max_input + np.abs(self.bias.astype(np.int64))).max())


def integer_layers(net: CausalNet) -> list[IntLayer]:
    """The QAT network's integers. shift = e + in_shift - ACT_SHIFT maps acc to the next grid."""
    layers = []
    for layer in net.layers():
        w, b, e = layer.quantised()
        w_int = np.rint(w.detach().numpy() * 2.0**e).astype(np.int8)
        b_int = np.rint(b.detach().numpy() * 2.0 ** (e + layer.in_shift)).astype(np.int64)
        if np.abs(b_int).max(initial=0) >= ACCUMULATOR_LIMIT:
            raise ValueError(f"bias of {layer} does not fit the accumulator bound")
        layers.append(IntLayer(w_int, b_int.astype(np.int32), e + layer.in_shift - ACT_SHIFT))
    layers[-1].shift += ACT_SHIFT  # the head's accumulator is returned raw: real = acc·2^-shift
    return layers


def check_bounds(layers: list[IntLayer]) -> list[int]:
    bounds = [layer.bound() for layer in layers]
    for i, bound in enumerate(bounds):
        if bound >= ACCUMULATOR_LIMIT:
            raise ValueError(
                f"layer {i}: accumulator bound {bound} ≥ 2^24, float32 would round: retrain "
                "with smaller weights or fewer channels"
            )
    return bounds


def block_layers(layers: list[IntLayer], inner: int) -> list[tuple[IntLayer, IntLayer | None]]:
    """The residual blocks in `layers` (integer_layers order): (3×3 layer, 1×1 layer or None)."""
    body = layers[1:-2]
    if inner:
        return list(zip(body[0::2], body[1::2], strict=True))
    return [(layer, None) for layer in body]


def pointwise(layer: IntLayer) -> np.ndarray:
    """A 1×1 layer's weights as a (cin, cout) matrix."""
    return layer.weight[:, :, 0, 0].T.copy()


def _graphs(layers: list[IntLayer], inner: int) -> tuple[bytes, bytes]:
    from onnx import TensorProto, checker, helper, numpy_helper

    first, hidden, head = layers[0], layers[-2], layers[-1]
    blocks = block_layers(layers, inner)
    channels = first.weight.shape[0]
    inits, nodes = [], []

    def const(name: str, array: np.ndarray) -> str:
        """An integer initializer cast to float32 inside the graph (small files, exact values)."""
        inits.append(numpy_helper.from_array(array, name + "_int"))
        nodes.append(helper.make_node("Cast", [name + "_int"], [name], to=TensorProto.FLOAT))
        return name

    def scalar(name: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    lo, hi = scalar("zero", 0.0), scalar("act_max", 127.0)

    def requant(name: str, acc: str, shift: int, residual: str | None = None) -> str:
        nodes.append(
            helper.make_node("Mul", [acc, scalar(f"{name}_scale", 2.0**-shift)], [f"{name}_scaled"])
        )
        nodes.append(helper.make_node("Floor", [f"{name}_scaled"], [f"{name}_floor"]))
        src = f"{name}_floor"
        if residual is not None:
            nodes.append(helper.make_node("Add", [residual, src], [f"{name}_sum"]))
            src = f"{name}_sum"
        nodes.append(helper.make_node("Clip", [src, lo, hi], [name]))
        return name

    # Whole image: NCHW Conv with the masked kernels.
    def conv(name: str, x: str, layer: IntLayer) -> str:
        w, b = const(f"{name}_w", layer.weight), const(f"{name}_b", layer.bias)
        pad = layer.weight.shape[-1] // 2
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{name}_acc"], pads=[pad] * 4))
        return f"{name}_acc"

    h = requant("h0", conv("c0", "feats", first), first.shift)
    for i, (block, inner_layer) in enumerate(blocks, 1):
        if inner_layer is None:
            h = requant(f"h{i}", conv(f"c{i}", h, block), block.shift, residual=h)
        else:
            y = requant(f"y{i}", conv(f"c{i}", h, block), block.shift)
            h = requant(f"h{i}", conv(f"ci{i}", y, inner_layer), inner_layer.shift, residual=h)
    h = requant("hid", conv("chid", h, hidden), hidden.shift)
    nodes.append(
        helper.make_node(
            "Conv", [h, const("head_w", head.weight), const("head_b", head.bias)], ["acc"]
        )
    )
    full = helper.make_graph(
        nodes,
        "compacs-learned-full",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", N_FEATURES, "H", "W"])],
        [helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["B", 2, "H", "W"])],
        inits,
    )

    # One wavefront step: n pixels, MatMul over gathered neighbourhoods.
    inits, nodes = [], []
    lo, hi = scalar("zero", 0.0), scalar("act_max", 127.0)

    def matmul(name: str, x: str, matrix: np.ndarray, bias: np.ndarray) -> str:
        w, b = const(f"{name}_w", matrix), const(f"{name}_b", bias)
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}_mm"]))
        nodes.append(helper.make_node("Add", [f"{name}_mm", b], [f"{name}_acc"]))
        return f"{name}_acc"

    def taps(layer: IntLayer, positions: list[tuple[int, int]]) -> np.ndarray:
        """(len(positions)·cin, cout): rows tap-major, then input channel."""
        w = layer.weight
        return np.concatenate([w[:, :, dy, dx].T for dy, dx in positions]).astype(np.int8)

    h = requant("h0", matmul("c0", "feat", taps(first, FIRST_TAPS), first.bias), first.shift)
    outs = [h]
    for i, (block, inner_layer) in enumerate(blocks, 1):
        nodes.append(
            helper.make_node("Gather", ["nb", scalar_index(inits, i - 1)], [f"nb{i}"], axis=0)
        )
        nodes.append(helper.make_node("Concat", [f"nb{i}", h], [f"in{i}"], axis=1))
        acc = matmul(f"c{i}", f"in{i}", taps(block, [*BLOCK_TAPS, (1, 1)]), block.bias)
        if inner_layer is None:
            h = requant(f"h{i}", acc, block.shift, residual=h)
        else:
            y = requant(f"y{i}", acc, block.shift)
            acc = matmul(f"ci{i}", y, pointwise(inner_layer), inner_layer.bias)
            h = requant(f"h{i}", acc, inner_layer.shift, residual=h)
        outs.append(h)
    h = requant("hid", matmul("chid", h, pointwise(hidden), hidden.bias), hidden.shift)
    matmul("head", h, pointwise(head), head.bias)
    nodes.append(helper.make_node("Identity", ["head_acc"], ["acc"]))
    for i, name in enumerate(outs[:-1]):
        nodes.append(helper.make_node("Unsqueeze", [name, scalar_axes(inits)], [f"u{i}"]))
    nodes.append(helper.make_node("Concat", [f"u{i}" for i in range(len(outs) - 1)], ["h"], axis=0))
    n_cached = len(blocks)
    step = helper.make_graph(
        nodes,
        "compacs-learned-step",
        [
            helper.make_tensor_value_info(
                "feat", TensorProto.FLOAT, ["n", len(FIRST_TAPS) * N_FEATURES]
            ),
            helper.make_tensor_value_info(
                "nb", TensorProto.FLOAT, [n_cached, "n", len(BLOCK_TAPS) * channels]
            ),
        ],
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [n_cached, "n", channels]),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["n", 2]),
        ],
        inits,
    )
    out = []
    for graph in (full, step):
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="compacs.models.training.export",
        )
        model.ir_version = 8
        checker.check_model(model)
        out.append(model.SerializeToString())
    return out[0], out[1]


def scalar_index(inits: list, i: int) -> str:
    from onnx import numpy_helper

    name = f"index{i}"
    if not any(t.name == name for t in inits):
        inits.append(numpy_helper.from_array(np.array(i, dtype=np.int64), name))
    return name


def scalar_axes(inits: list) -> str:
    from onnx import numpy_helper

    if not any(t.name == "axes0" for t in inits):
        inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axes0"))
    return "axes0"


def export(weights: Path, out: Path) -> dict:
    """Write the shipped files for the trained `weights` (final.pt); returns meta.json's content."""
    import torch

    state = torch.load(weights, weights_only=False)
    cfg = state["config"]
    inner = int(cfg.get("inner", 0))  # weights trained before the inner layer existed have none
    net = CausalNet(cfg["channels"], cfg["blocks"], inner)
    net.load_state_dict(state["net"])
    layers = integer_layers(net)
    bounds = check_bounds(layers)
    full, step = _graphs(layers, inner)
    freqs, lows = build_tables()
    out.mkdir(parents=True, exist_ok=True)
    (out / "full.onnx").write_bytes(full)
    (out / "step.onnx").write_bytes(step)
    np.savez(out / "tables.npz", freqs=freqs, lows=lows)
    arrays = {}
    for i, layer in enumerate(layers):
        arrays |= {f"w{i}": layer.weight, f"b{i}": layer.bias, f"s{i}": np.int64(layer.shift)}
    np.savez(out / "weights.npz", **arrays)
    summary_path = weights.with_name("summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    meta = {
        "format": 1,
        "channels": cfg["channels"],
        "blocks": cfg["blocks"],
        "inner": inner,
        "feature_shift": FEATURE_SHIFT,
        "first_taps": FIRST_TAPS,
        "block_taps": BLOCK_TAPS,
        "head_shift": layers[-1].shift,
        "accumulator_bounds": bounds,
        "parameters": int(sum(np.count_nonzero(la.weight) + la.bias.size for la in layers)),
        "training": {k: v for k, v in summary.items() if k != "log"},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    from .train import default_work_dir

    parser = argparse.ArgumentParser(
        prog="python -m compacs.models.training.export", description=__doc__
    )
    parser.add_argument("--weights", type=Path, default=default_work_dir() / "final.pt")
    parser.add_argument("--out", type=Path, default=SHIPPED)
    args = parser.parse_args(argv)
    if not args.weights.exists():
        raise SystemExit(
            f"{args.weights} not found: run python -m compacs.models.training.train first"
        )
    meta = export(args.weights, args.out)
    print(json.dumps({k: v for k, v in meta.items() if k != "training"}, indent=1))
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(f"wrote {args.out}: {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
